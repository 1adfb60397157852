import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, ev, refused, session } from "./harness";

describe("events", () => {
  test("numbered by the store from 1, per session; listed after a seq; last seq", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    await alice.mutation(api.sessions.create, { session: session("ses-2") });
    expect(await alice.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(0);
    const first = await alice.mutation(api.events.append, {
      session_id: "ses-1", key: "a", events: [ev("text.delta", { delta: "1" }, 100)],
    });
    expect(first).toEqual([{ seq: 1, type: "text.delta", data: '{"delta":"1"}', ts: 100 }]);
    const batch = await alice.mutation(api.events.append, {
      session_id: "ses-1", key: "b", events: [2, 3, 4, 5].map((n) => ev("text.delta", { delta: String(n) })),
    });
    expect(batch.map((e) => e.seq)).toEqual([2, 3, 4, 5]);
    expect((await alice.mutation(api.events.append, { session_id: "ses-2", key: "a", events: [ev()] }))[0].seq).toBe(1);
    expect(await alice.mutation(api.events.append, { session_id: "ses-1", key: "c", events: [] })).toEqual([]);
    expect(await alice.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(5);
    const after = await alice.query(api.events.list, { session_id: "ses-1", after: 2, limit: 1000 });
    expect(after.map((e) => e.seq)).toEqual([3, 4, 5]);
    expect(JSON.parse(after[0].data)).toEqual({ delta: "3" });
    expect((await alice.query(api.events.list, { session_id: "ses-1", after: 0, limit: 2 })).map((e) => e.seq)).toEqual([1, 2]);
  });

  test("concurrent appends from many writers: no gap, no duplicate, batches contiguous", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    const writers = Array.from({ length: 20 }, (_, n) =>
      alice.mutation(api.events.append, {
        session_id: "ses-1", key: `w${n}`, events: [ev("w", { n, i: 0 }), ev("w", { n, i: 1 }), ev("w", { n, i: 2 })],
      }),
    );
    const results = await Promise.all(writers);
    const seqs = results.flat().map((e) => e.seq).sort((a, b) => a - b);
    expect(seqs).toEqual(Array.from({ length: 60 }, (_, n) => n + 1));
    for (const batch of results) expect(batch.map((e) => e.seq - batch[0].seq)).toEqual([0, 1, 2]);
    const stored = await alice.query(api.events.list, { session_id: "ses-1", after: 0, limit: 1000 });
    expect(stored.map((e) => e.seq)).toEqual(seqs);
  });

  test("a retried batch (same key) returns the first result and appends nothing; a reused key conflicts", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    const batch = { session_id: "ses-1", key: "k1", events: [ev("a"), ev("b")] };
    const first = await alice.mutation(api.events.append, batch);
    await alice.mutation(api.events.append, { session_id: "ses-1", key: "k2", events: [ev("c")] });
    expect(await alice.mutation(api.events.append, batch)).toEqual(first);
    expect(await alice.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(3);
    expect(await refused(alice.mutation(api.events.append, { ...batch, events: [ev("a")] }))).toBe("conflict");
    expect(await refused(alice.mutation(api.events.append, { ...batch, events: [ev("a"), ev("x")] }))).toBe("conflict");
    expect(await alice.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(3);
  });

  test("a batch is checked whole before anything is written", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    const poisoned = [ev(), { type: "t", data: "{not json", ts: 1 }];
    expect(await refused(alice.mutation(api.events.append, { session_id: "ses-1", key: "k", events: poisoned }))).toBe("invalid");
    const tooMany = Array.from({ length: 501 }, () => ev());
    expect(await refused(alice.mutation(api.events.append, { session_id: "ses-1", key: "k", events: tooMany }))).toBe("invalid");
    expect(await refused(alice.mutation(api.events.append, { session_id: "ses-1", key: "", events: [ev()] }))).toBe("invalid");
    // Sizes are UTF-8 bytes: what fits a Convex document, and a transaction's writes.
    const euros = JSON.stringify("\u20ac".repeat(300_000)); // 900,002 bytes
    expect(await refused(alice.mutation(api.events.append, { session_id: "ses-1", key: "k", events: [{ type: "t", data: euros, ts: 1 }] }))).toBe("invalid");
    const big = JSON.stringify("x".repeat(850_000));
    const tooBig = Array.from({ length: 10 }, () => ({ type: "t", data: big, ts: 1 }));
    expect(await refused(alice.mutation(api.events.append, { session_id: "ses-1", key: "k", events: tooBig }))).toBe("invalid");
    expect(await alice.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(0);
    const fits = await alice.mutation(api.events.append, { session_id: "ses-1", key: "k", events: tooBig.slice(0, 9) });
    expect(fits.map((e) => e.seq)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9]);
    for (const [after, limit] of [[2 ** 64, 10], [-1, 10], [0.5, 10], [0, 0], [0, 1001]]) {
      expect(await refused(alice.query(api.events.list, { session_id: "ses-1", after, limit }))).toBe("invalid");
    }
  });

  test("user B can neither read nor append to user A's log; a missing session takes no events", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    await alice.mutation(api.events.append, { session_id: "ses-1", key: "k", events: [ev("secret")] });
    expect(await bob.query(api.events.list, { session_id: "ses-1", after: 0, limit: 10 })).toEqual([]);
    expect(await bob.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(0);
    expect(await refused(bob.mutation(api.events.append, { session_id: "ses-1", key: "b", events: [ev()] }))).toBe("not_found");
    // Replaying Alice's key does not hand Bob her batch either.
    expect(await refused(bob.mutation(api.events.append, { session_id: "ses-1", key: "k", events: [ev("secret")] }))).toBe("not_found");
    expect(await refused(alice.mutation(api.events.append, { session_id: "nope", key: "k", events: [ev()] }))).toBe("not_found");
    expect(await alice.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(1);
  });
});

// Messages, parts and snapshots.
import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, refused, session } from "./harness";

describe("messages and parts", () => {
  test("upserted by id, listed in creation order with their parts", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    const s = "ses-1";
    await alice.mutation(api.messages.upsert, { session_id: s, message_id: "m1", role: "user", info: "{}" });
    await alice.mutation(api.messages.upsert, { session_id: s, message_id: "m2", role: "assistant", info: '{"modelID":"x"}' });
    await alice.mutation(api.messages.upsertPart, { session_id: s, message_id: "m1", part_id: "p1", part: '{"type":"text","text":"hi"}' });
    await alice.mutation(api.messages.upsertPart, { session_id: s, message_id: "m2", part_id: "p2", part: '{"type":"tool","status":"running"}' });
    await alice.mutation(api.messages.upsertPart, { session_id: s, message_id: "m2", part_id: "p2", part: '{"type":"tool","status":"completed"}' });
    await alice.mutation(api.messages.upsertPart, { session_id: s, message_id: "m9", part_id: "p9", part: "{}" });
    await alice.mutation(api.messages.upsert, { session_id: s, message_id: "m1", role: "user", info: '{"v":2}' });
    const messages = await alice.query(api.messages.list, { session_id: s });
    expect(messages.map((m) => [m.id, m.role, m.info])).toEqual([["m1", "user", '{"v":2}'], ["m2", "assistant", '{"modelID":"x"}']]);
    expect(messages[1].parts).toEqual([{ id: "p2", part: '{"type":"tool","status":"completed"}' }]);
    expect(await refused(alice.mutation(api.messages.upsert, { session_id: s, message_id: "m3", role: "user", info: "nope" }))).toBe("invalid");
  });

  test("user B can neither read nor write user A's messages", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    await alice.mutation(api.messages.upsert, { session_id: "ses-1", message_id: "m1", role: "user", info: '{"secret":1}' });
    expect(await bob.query(api.messages.list, { session_id: "ses-1" })).toEqual([]);
    expect(await refused(bob.mutation(api.messages.upsert, { session_id: "ses-1", message_id: "m1", role: "user", info: "{}" }))).toBe("not_found");
    expect(await refused(bob.mutation(api.messages.upsertPart, { session_id: "ses-1", message_id: "m1", part_id: "x", part: "{}" }))).toBe("not_found");
    expect((await alice.query(api.messages.list, { session_id: "ses-1" }))[0].info).toBe('{"secret":1}');
  });
});

describe("snapshots", () => {
  const snap = (id: string, created_at: number, size = 10) => ({
    snapshot: { session_id: "ses-1", id, ref: JSON.stringify({ path: `/s/${id}` }), size, created_at },
  });

  test("newest first, deleted one by one; a retried add is a no-op, another with its id conflicts", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    for (const [n, id] of ["snap0", "snap1", "snap2"].entries()) await alice.mutation(api.snapshots.add, snap(id, 100 + n));
    await alice.mutation(api.snapshots.add, snap("snap3", 102)); // same time: the latest added first
    await alice.mutation(api.snapshots.add, snap("snap0", 100)); // a retry
    expect(await refused(alice.mutation(api.snapshots.add, snap("snap0", 100, 99)))).toBe("conflict");
    expect((await alice.query(api.snapshots.list, { session_id: "ses-1" })).map((s) => s.id)).toEqual(["snap3", "snap2", "snap1", "snap0"]);
    expect((await alice.query(api.snapshots.list, { session_id: "ses-1" }))[0]).toEqual({
      session_id: "ses-1", id: "snap3", ref: '{"path":"/s/snap3"}', size: 10, created_at: 102,
    });
    await alice.mutation(api.snapshots.remove, { session_id: "ses-1", id: "snap1" });
    await alice.mutation(api.snapshots.remove, { session_id: "ses-1", id: "snap1" });
    expect((await alice.query(api.snapshots.list, { session_id: "ses-1" })).map((s) => s.id)).toEqual(["snap3", "snap2", "snap0"]);
    expect(await refused(alice.mutation(api.snapshots.add, snap("bad", 1, -1)))).toBe("invalid");
  });

  test("user B can neither list, add nor delete user A's snapshots", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    await alice.mutation(api.snapshots.add, snap("snap0", 100));
    expect(await bob.query(api.snapshots.list, { session_id: "ses-1" })).toEqual([]);
    expect(await refused(bob.mutation(api.snapshots.add, snap("evil", 1)))).toBe("not_found");
    await bob.mutation(api.snapshots.remove, { session_id: "ses-1", id: "snap0" });
    expect((await alice.query(api.snapshots.list, { session_id: "ses-1" })).map((s) => s.id)).toEqual(["snap0"]);
  });
});

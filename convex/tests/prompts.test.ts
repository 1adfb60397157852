import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, refused, session } from "./harness";

const prompt = (id: string, text = `text ${id}`, extra: Record<string, unknown> = {}) => ({
  prompt: { id, session_id: "ses-1", text, status: "queued", created_at: 1, ...extra },
});

describe("prompts", () => {
  test("queued in order with positions from 1; status tracked; pending in delivery order", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    for (const [n, id] of ["p0", "p1", "p2"].entries()) {
      expect((await alice.mutation(api.prompts.enqueue, prompt(id))).position).toBe(n + 1);
    }
    await alice.mutation(api.prompts.setStatus, { id: "p0", status: "done" });
    await alice.mutation(api.prompts.setStatus, { id: "p1", status: "running" });
    const pending = await alice.query(api.prompts.pending, { session_id: "ses-1" });
    expect(pending.map((p) => [p.id, p.status, p.position])).toEqual([["p1", "running", 2], ["p2", "queued", 3]]);
    expect(await alice.query(api.prompts.pending, { session_id: "ses-other" })).toEqual([]);
    expect(await refused(alice.mutation(api.prompts.setStatus, { id: "p1", status: "bogus" }))).toBe("invalid");
    expect(await refused(alice.mutation(api.prompts.setStatus, { id: "nope", status: "done" }))).toBe("not_found");
  });

  test("concurrent enqueues get unique, consecutive positions", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    const got = await Promise.all(Array.from({ length: 15 }, (_, n) => alice.mutation(api.prompts.enqueue, prompt(`p${n}`))));
    expect(got.map((p) => p.position).sort((a, b) => a - b)).toEqual(Array.from({ length: 15 }, (_, n) => n + 1));
  });

  test("a retried enqueue returns the first result; the id with other content conflicts", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    const first = await alice.mutation(api.prompts.enqueue, prompt("p1"));
    expect(await alice.mutation(api.prompts.enqueue, prompt("p1"))).toEqual(first);
    expect(await refused(alice.mutation(api.prompts.enqueue, prompt("p1", "again")))).toBe("conflict");
    expect(await refused(alice.mutation(api.prompts.enqueue, prompt("p2", "\ud800")))).toBe("invalid");
    expect(await refused(alice.mutation(api.prompts.enqueue, prompt("p3", "t", { status: "weird" })))).toBe("invalid");
    expect((await alice.query(api.prompts.pending, { session_id: "ses-1" })).map((p) => p.id)).toEqual(["p1"]);
    expect((await alice.mutation(api.prompts.enqueue, prompt("p4"))).position).toBe(2); // no gap left
  });

  test("attachments are optional, kept with the prompt, checked as JSON and part of the idempotency key", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    const attachments = JSON.stringify([{ kind: "variable", label: "df", content: "df: 2 rows", truncated: false }]);
    const first = await alice.mutation(api.prompts.enqueue, prompt("p1", "t", { attachments }));
    expect(first.attachments).toBe(attachments);
    expect(await alice.mutation(api.prompts.enqueue, prompt("p1", "t", { attachments }))).toEqual(first);
    expect(await refused(alice.mutation(api.prompts.enqueue, prompt("p1", "t")))).toBe("conflict");
    expect(await refused(alice.mutation(api.prompts.enqueue, prompt("p2", "t", { attachments: "{nope" })))).toBe("invalid");
    await alice.mutation(api.prompts.enqueue, prompt("p3"));
    const pending = await alice.query(api.prompts.pending, { session_id: "ses-1" });
    expect(pending.map((p) => [p.id, p.attachments])).toEqual([["p1", attachments], ["p3", undefined]]);
  });

  test("user B can neither queue into, read, nor change user A's prompts", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    await alice.mutation(api.prompts.enqueue, prompt("p1", "alice's secret"));
    expect(await bob.query(api.prompts.pending, { session_id: "ses-1" })).toEqual([]);
    expect(await refused(bob.mutation(api.prompts.enqueue, prompt("p2")))).toBe("not_found");
    expect(await refused(bob.mutation(api.prompts.setStatus, { id: "p1", status: "done" }))).toBe("not_found");
    // Bob's retry of Alice's prompt id does not return her prompt.
    await bob.mutation(api.sessions.create, { session: session("ses-b", "bob") });
    expect(await refused(bob.mutation(api.prompts.enqueue, { prompt: { ...prompt("p1", "alice's secret").prompt, session_id: "ses-b" } }))).toBe("conflict");
    expect((await alice.query(api.prompts.pending, { session_id: "ses-1" }))[0].status).toBe("queued");
  });
});

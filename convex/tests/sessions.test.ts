import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, ev, refused, session } from "./harness";

describe("sessions", () => {
  test("create, get, list newest first, update; owner only", async () => {
    const { alice, bob } = deployment();
    const one = await alice.mutation(api.sessions.create, { session: session("ses-1", "alice", { model: "m" }) });
    expect(one).toMatchObject({ id: "ses-1", owner: "alice", model: "m", state: "idle", server_id: null });
    expect(one.created_at).toBeGreaterThan(0);
    await alice.mutation(api.sessions.create, { session: session("ses-2", "alice", { created_at: one.created_at + 5 }) });
    await bob.mutation(api.sessions.create, { session: session("ses-3", "bob") });
    expect((await alice.query(api.sessions.list, {})).map((s) => s.id)).toEqual(["ses-2", "ses-1"]);
    expect((await bob.query(api.sessions.list, {})).map((s) => s.id)).toEqual(["ses-3"]);
    expect(await alice.query(api.sessions.get, { id: "nope" })).toBeNull();
    await alice.mutation(api.sessions.update, {
      id: "ses-1",
      fields: { state: "error", error: "boom", sandbox_state: '{"pid": 3}' },
    });
    expect(await alice.query(api.sessions.get, { id: "ses-1" })).toMatchObject({
      state: "error", error: "boom", sandbox_state: '{"pid": 3}',
    });
    await alice.mutation(api.sessions.update, { id: "ses-1", fields: { error: null } });
    expect((await alice.query(api.sessions.get, { id: "ses-1" }))!.error).toBeNull();
  });

  test("user B gets nothing of user A's session: no read, no write, no delete", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    expect(await bob.query(api.sessions.get, { id: "ses-1" })).toBeNull();
    expect(await bob.query(api.sessions.list, {})).toEqual([]);
    expect(await refused(bob.mutation(api.sessions.update, { id: "ses-1", fields: { state: "x" } }))).toBe("not_found");
    await bob.mutation(api.sessions.remove, { id: "ses-1" });
    expect(await alice.query(api.sessions.get, { id: "ses-1" })).toMatchObject({ state: "idle" });
    // Nor can B create a session in A's name, or take A's session id.
    expect(await refused(bob.mutation(api.sessions.create, { session: session("ses-9", "alice") }))).toBe("forbidden");
    expect(await refused(bob.mutation(api.sessions.create, { session: session("ses-1", "bob") }))).toBe("conflict");
  });

  test("a duplicate create conflicts unless it is a retry with the same key", async () => {
    const { alice } = deployment();
    const first = await alice.mutation(api.sessions.create, { session: session("ses-1"), key: "k1" });
    expect(await alice.mutation(api.sessions.create, { session: session("ses-1"), key: "k1" })).toEqual(first);
    expect(await refused(alice.mutation(api.sessions.create, { session: session("ses-1"), key: "k2" }))).toBe("conflict");
    expect(await refused(alice.mutation(api.sessions.create, { session: session("ses-1") }))).toBe("conflict");
    expect((await alice.query(api.sessions.list, {})).length).toBe(1);
  });

  test("bad input is invalid: unknown fields, bad JSON, lone surrogates", async () => {
    const { alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    // An unknown field fails Convex's own argument validation (no ConvexError data).
    await expect(
      alice.mutation(api.sessions.update, { id: "ses-1", fields: { owner: "mallory" } as never }),
    ).rejects.toThrow(/Validator|validator|owner/);
    expect(await refused(alice.mutation(api.sessions.update, { id: "ses-1", fields: { sandbox_state: "{" } }))).toBe("invalid");
    expect(await refused(alice.mutation(api.sessions.create, { session: session("ses-2", "alice", { repo: "\ud800" }) }))).toBe("invalid");
    expect(await refused(alice.mutation(api.sessions.create, { session: session("") }))).toBe("invalid");
    expect(await refused(alice.mutation(api.sessions.create, { session: session("s".repeat(201)) }))).toBe("invalid");
    expect((await alice.mutation(api.sessions.create, { session: session("s".repeat(200)) })).id).toHaveLength(200);
  });

  test("remove deletes the session and every child, all at once; a new session with the id starts empty", async () => {
    const { t, alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    await alice.mutation(api.sessions.create, { session: session("ses-2") });
    await alice.mutation(api.events.append, { session_id: "ses-1", key: "b1", events: [ev(), ev()] });
    await alice.mutation(api.events.append, { session_id: "ses-2", key: "b1", events: [ev()] });
    await alice.mutation(api.prompts.enqueue, { prompt: { id: "p1", session_id: "ses-1", text: "t", status: "queued", created_at: 1 } });
    await alice.mutation(api.messages.upsert, { session_id: "ses-1", message_id: "m1", role: "user", info: "{}" });
    await alice.mutation(api.messages.upsertPart, { session_id: "ses-1", message_id: "m1", part_id: "x", part: "{}" });
    await alice.mutation(api.snapshots.add, { snapshot: { session_id: "ses-1", id: "s", ref: "{}", size: 1, created_at: 1 } });
    await alice.mutation(api.sessions.remove, { id: "ses-1" });
    expect(await alice.query(api.sessions.get, { id: "ses-1" })).toBeNull();
    const left = await t.run(async (ctx) =>
      Promise.all((["events", "prompts", "messages", "parts", "snapshots"] as const).map(
        async (table) => (await ctx.db.query(table).collect()).length)));
    expect(left).toEqual([1, 0, 0, 0, 0]); // only ses-2's event
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    expect(await alice.query(api.events.lastSeq, { session_id: "ses-1" })).toBe(0);
    expect(await alice.query(api.events.list, { session_id: "ses-2", after: 0, limit: 10 })).toHaveLength(1);
  });

  test("a big session is deleted at once and its children purged by scheduled mutations", async () => {
    const { t, alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    for (let n = 0; n < 3; n++) { // more than one mutation's purge budget (1000)
      await alice.mutation(api.events.append, {
        session_id: "ses-1", key: `b${n}`, events: Array.from({ length: 500 }, () => ev()),
      });
    }
    await alice.mutation(api.sessions.remove, { id: "ses-1" });
    expect(await alice.query(api.sessions.get, { id: "ses-1" })).toBeNull();
    await t.finishAllScheduledFunctions(() => {});
    expect(await t.run(async (ctx) => (await ctx.db.query("events").collect()).length)).toBe(0);
  });

  test("servers list every session page by page, read any session, and claim by compare-and-swap", async () => {
    const { alice, bob, server } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1", "alice", { created_at: 1 }) });
    await alice.mutation(api.sessions.create, { session: session("ses-2", "alice", { created_at: 2, server_id: "srv-a" }) });
    await bob.mutation(api.sessions.create, { session: session("ses-3", "bob", { created_at: 3 }) });
    const first = await server.query(api.sessions.listAll, { cursor: null, num_items: 2 });
    expect(first.page.map((s) => s.id)).toEqual(["ses-3", "ses-2"]);
    expect(first.is_done).toBe(false);
    const second = await server.query(api.sessions.listAll, { cursor: first.continue_cursor, num_items: 2 });
    expect(second.page.map((s) => s.id)).toEqual(["ses-1"]);
    expect(await server.query(api.sessions.get, { id: "ses-3" })).toMatchObject({ owner: "bob" });

    expect(await server.mutation(api.sessions.claim, { id: "ses-1", server_id: "srv-a", expected: null })).toBe(true);
    expect(await server.mutation(api.sessions.claim, { id: "ses-1", server_id: "srv-b", expected: null })).toBe(false);
    expect(await server.mutation(api.sessions.claim, { id: "ses-2", server_id: "srv-b", expected: "srv-c" })).toBe(false);
    expect(await server.mutation(api.sessions.claim, { id: "nope", server_id: "srv-b", expected: null })).toBe(false);
    // A retried claim that happened answers true.
    expect(await server.mutation(api.sessions.claim, { id: "ses-1", server_id: "srv-a", expected: null })).toBe(true);
    expect((await alice.query(api.sessions.get, { id: "ses-1" }))!.server_id).toBe("srv-a");
    expect(await refused(server.query(api.sessions.listAll, { cursor: null, num_items: 0 }))).toBe("invalid");
  });
});

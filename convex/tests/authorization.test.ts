// Every public function, called by the wrong kind of caller: anonymous, a token of an issuer
// tabbi does not use, a user calling server work, a server calling users' functions.
import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, refused, session } from "./harness";

const sid = { session_id: "ses-1" };
const USER_FUNCTIONS: [string, "query" | "mutation", any, Record<string, unknown>][] = [
  ["users:upsert", "mutation", api.users.upsert, { profile: "{}" }],
  ["users:get", "query", api.users.get, {}],
  ["sessions:create", "mutation", api.sessions.create, { session: session("ses-9") }],
  ["sessions:list", "query", api.sessions.list, {}],
  ["sessions:update", "mutation", api.sessions.update, { id: "ses-1", fields: { state: "x" } }],
  ["sessions:remove", "mutation", api.sessions.remove, { id: "ses-1" }],
  ["events:append", "mutation", api.events.append, { ...sid, key: "k", events: [] }],
  ["events:list", "query", api.events.list, { ...sid, after: 0, limit: 10 }],
  ["events:lastSeq", "query", api.events.lastSeq, sid],
  ["prompts:enqueue", "mutation", api.prompts.enqueue, { prompt: { id: "p", ...sid, text: "t", status: "queued", created_at: 1 } }],
  ["prompts:pending", "query", api.prompts.pending, sid],
  ["prompts:setStatus", "mutation", api.prompts.setStatus, { id: "p", status: "done" }],
  ["messages:upsert", "mutation", api.messages.upsert, { ...sid, message_id: "m", role: "user", info: "{}" }],
  ["messages:upsertPart", "mutation", api.messages.upsertPart, { ...sid, message_id: "m", part_id: "p", part: "{}" }],
  ["messages:list", "query", api.messages.list, sid],
  ["snapshots:add", "mutation", api.snapshots.add, { snapshot: { ...sid, id: "s", ref: "{}", size: 1, created_at: 1 } }],
  ["snapshots:list", "query", api.snapshots.list, sid],
  ["snapshots:remove", "mutation", api.snapshots.remove, { ...sid, id: "s" }],
  ["tokens:put", "mutation", api.tokens.put, { provider: "github", ciphertext: "eA==" }],
  ["tokens:swap", "mutation", api.tokens.swap, { provider: "github", expected: "eA==", ciphertext: null }],
  ["tokens:get", "query", api.tokens.get, { provider: "github" }],
  ["tokens:remove", "mutation", api.tokens.remove, { provider: "github" }],
  ["spend:retire", "mutation", api.spend.retire, { ...sid, cost: 1, seconds: 1 }],
  ["spend:total", "query", api.spend.total, {}],
];
const SERVER_FUNCTIONS: typeof USER_FUNCTIONS = [
  ["leases:put", "mutation", api.leases.put, { server_id: "srv-a", expires_at: 1, heartbeat_at: 1, info: "{}" }],
  ["leases:list", "query", api.leases.list, {}],
  ["leases:release", "mutation", api.leases.release, { server_id: "srv-a" }],
  ["sessions:claim", "mutation", api.sessions.claim, { id: "ses-1", server_id: "srv-a", expected: null }],
  ["sessions:listAll", "query", api.sessions.listAll, { cursor: null, num_items: 10 }],
];

describe("authorization", () => {
  test("anonymous callers and tokens of other issuers are refused by every function but the ping", async () => {
    const { t, stranger, alice } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    expect(await t.query(api.health.ping, {})).toBe(true);
    for (const [name, kind, ref, args] of [...USER_FUNCTIONS, ...SERVER_FUNCTIONS, ["sessions:get", "query", api.sessions.get, { id: "ses-1" }] as const]) {
      expect(await refused((t as any)[kind](ref, args)), name).toBe("unauthenticated");
      expect(await refused((stranger as any)[kind](ref, args)), name).toBe("forbidden");
    }
  });

  test("a server identity may not touch users' content, and a user may not do server work", async () => {
    const { alice, server } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    for (const [name, kind, ref, args] of USER_FUNCTIONS) {
      expect(await refused((server as any)[kind](ref, args)), name).toBe("forbidden");
    }
    for (const [name, kind, ref, args] of SERVER_FUNCTIONS) {
      expect(await refused((alice as any)[kind](ref, args)), name).toBe("forbidden");
    }
    // Nothing of the above changed Alice's session.
    expect(await alice.query(api.sessions.get, { id: "ses-1" })).toMatchObject({ state: "idle", server_id: null });
  });

  test("a user named like the server role is still a user", async () => {
    const { as } = deployment();
    const impostor = as("srv-a"); // the user issuer, whatever the subject
    expect(await refused(impostor.query(api.leases.list, {}))).toBe("forbidden");
  });
});

import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, session } from "./harness";

describe("leases", () => {
  test("taken, renewed, listed; a release frees the server's sessions in one go", async () => {
    const { alice, bob, server } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1", "alice", { server_id: "srv-a" }) });
    await bob.mutation(api.sessions.create, { session: session("ses-2", "bob", { server_id: "srv-a" }) });
    await alice.mutation(api.sessions.create, { session: session("ses-3", "alice", { server_id: "srv-b" }) });
    await server.mutation(api.leases.put, { server_id: "srv-a", expires_at: 30, heartbeat_at: 1, info: '{"pid":1}' });
    await server.mutation(api.leases.put, { server_id: "srv-b", expires_at: 30, heartbeat_at: 1, info: "{}" });
    await server.mutation(api.leases.put, { server_id: "srv-a", expires_at: 2e9, heartbeat_at: 2, info: '{"pid":1}' });
    const leases = await server.query(api.leases.list, {});
    expect(leases.map((l) => l.server_id).sort()).toEqual(["srv-a", "srv-b"]);
    expect(leases.find((l) => l.server_id === "srv-a")).toEqual({ server_id: "srv-a", expires_at: 2e9, heartbeat_at: 2, info: '{"pid":1}' });
    await server.mutation(api.leases.release, { server_id: "srv-a" });
    expect((await server.query(api.leases.list, {})).map((l) => l.server_id)).toEqual(["srv-b"]);
    const all = await server.query(api.sessions.listAll, { cursor: null, num_items: 10 });
    expect(Object.fromEntries(all.page.map((s) => [s.id, s.server_id]))).toEqual({ "ses-1": null, "ses-2": null, "ses-3": "srv-b" });
    await server.mutation(api.leases.release, { server_id: "srv-a" }); // again: nothing left to do
  });
});

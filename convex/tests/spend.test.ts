// Spend of deleted sessions (spend.ts). Threat: a person resets their spend by deleting sessions;
// what was retired must outlive the session, count once however often it is retried, never go
// down, be the owner's alone, and nobody may retire spend onto someone else's session.
import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, refused, session } from "./harness";

describe("retired spend", () => {
  test("outlives its session, counts once when retried, only grows, and is the owner's alone", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    await alice.mutation(api.sessions.create, { session: session("ses-2") });
    expect(await alice.query(api.spend.total, {})).toEqual({ cost: 0, seconds: 0 });
    const retire = (session_id: string, cost: number, seconds: number) =>
      alice.mutation(api.spend.retire, { session_id, cost, seconds });
    await retire("ses-1", 0.25, 30);
    await retire("ses-1", 0.25, 30); // a retried delete
    await retire("ses-1", 0.1, 40); // amounts only grow
    await retire("ses-2", 0.5, 0);
    // still here (a delete that failed half-way): counted through their own spend, not twice
    expect(await alice.query(api.spend.total, {})).toEqual({ cost: 0, seconds: 0 });
    await alice.mutation(api.sessions.remove, { id: "ses-1" });
    await retire("ses-1", 0.3, 0); // retried after the session went
    let total = await alice.query(api.spend.total, {});
    expect(total.cost).toBeCloseTo(0.3, 10);
    expect(total.seconds).toBe(40);
    await alice.mutation(api.sessions.remove, { id: "ses-2" });
    total = await alice.query(api.spend.total, {});
    expect(total.cost).toBeCloseTo(0.8, 10);
    expect(total.seconds).toBe(40);
    expect(await bob.query(api.spend.total, {})).toEqual({ cost: 0, seconds: 0 });
  });

  test("a user cannot retire spend onto another's session, and bad amounts are refused", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.sessions.create, { session: session("ses-1") });
    expect(await refused(bob.mutation(api.spend.retire, { session_id: "ses-1", cost: 1, seconds: 1 }))).toBe("not_found");
    for (const [cost, seconds] of [[-1, 0], [0, -1], [Number.NaN, 0], [Number.POSITIVE_INFINITY, 0]]) {
      expect(await refused(alice.mutation(api.spend.retire, { session_id: "ses-1", cost, seconds }))).toBe("invalid");
    }
    expect(await refused(alice.mutation(api.spend.retire, { session_id: "", cost: 1, seconds: 1 }))).toBe("invalid");
    expect(await alice.query(api.spend.total, {})).toEqual({ cost: 0, seconds: 0 });
    expect(await bob.query(api.spend.total, {})).toEqual({ cost: 0, seconds: 0 });
  });
});

// Spend of deleted sessions, so that a person cannot reset their budgets by deleting sessions
// (extension/budgets.py). A row per (owner, session id), written by the owner's identity before
// the session is deleted; there is no function that removes or lowers one.
import { v } from "convex/values";
import type { QueryCtx } from "./_generated/server";
import { mutation, query } from "./_generated/server";
import { fail } from "./lib/errors";
import { finite, id } from "./lib/checks";
import { sessionById, user } from "./lib/identity";

/** A spend to keep: finite and at least 0. */
function amount(value: number, what: string): number {
  if (finite(value, what) < 0) fail("invalid", `${what} must be >= 0`);
  return value;
}

async function find(ctx: QueryCtx, owner: string, session_id: string) {
  return await ctx.db
    .query("retired_spend")
    .withIndex("by_owner_session", (q) => q.eq("owner", owner).eq("session_id", session_id))
    .unique();
}

/** Keep a session's spend for its owner (the caller). Repeating it never adds twice: each amount
 * becomes the larger of the kept and the given one. A session that still exists must be the
 * caller's; one already gone is accepted (a retried delete), as it adds only to the caller's. */
export const retire = mutation({
  args: { session_id: v.string(), cost: v.number(), seconds: v.number() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const session_id = id(args.session_id, "session_id");
    const cost = amount(args.cost, "cost");
    const seconds = amount(args.seconds, "seconds");
    const session = await sessionById(ctx, session_id);
    if (session !== null && session.owner !== owner) fail("not_found", `no session ${session_id}`);
    const existing = await find(ctx, owner, session_id);
    if (existing === null) {
      await ctx.db.insert("retired_spend", { owner, session_id, cost, seconds, retired_at: Date.now() / 1000 });
    } else if (cost > existing.cost || seconds > existing.seconds) {
      await ctx.db.patch(existing._id, {
        cost: Math.max(cost, existing.cost),
        seconds: Math.max(seconds, existing.seconds),
      });
    }
    return null;
  },
});

/** The caller's retired spend, summed: `{cost, seconds}`, over the sessions that no longer exist
 * (one retired but still here, its delete failed half-way, counts through its own spend). */
export const total = query({
  args: {},
  returns: v.object({ cost: v.number(), seconds: v.number() }),
  handler: async (ctx) => {
    const owner = await user(ctx);
    let cost = 0;
    let seconds = 0;
    for await (const row of ctx.db
      .query("retired_spend")
      .withIndex("by_owner_session", (q) => q.eq("owner", owner))) {
      if ((await sessionById(ctx, row.session_id)) !== null) continue;
      cost += row.cost;
      seconds += row.seconds;
    }
    return { cost, seconds };
  },
});

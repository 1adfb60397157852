// A user's profile; the user is the token's subject, so nobody can read or write another's.
import { v } from "convex/values";
import { mutation, query } from "./_generated/server";
import { json } from "./lib/checks";
import { user } from "./lib/identity";

async function find(ctx: Parameters<typeof user>[0], username: string) {
  return await ctx.db
    .query("users")
    .withIndex("by_username", (q) => q.eq("username", username))
    .unique();
}

export const upsert = mutation({
  args: { profile: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const username = await user(ctx);
    const profile = json(args.profile, "profile");
    const existing = await find(ctx, username);
    const updated_at = Date.now() / 1000;
    if (existing) await ctx.db.patch(existing._id, { profile, updated_at });
    else await ctx.db.insert("users", { username, profile, updated_at });
    return null;
  },
});

export const get = query({
  args: {},
  returns: v.union(v.string(), v.null()),
  handler: async (ctx) => (await find(ctx, await user(ctx)))?.profile ?? null,
});

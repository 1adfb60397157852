// Encrypted tokens (the caller encrypts; Convex never sees a plain token). Keyed by the token's
// subject and a provider: a user reaches only their own.
import { v } from "convex/values";
import type { QueryCtx } from "./_generated/server";
import { mutation, query } from "./_generated/server";
import { base64, id } from "./lib/checks";
import { user } from "./lib/identity";

async function find(ctx: QueryCtx, owner: string, provider: string) {
  return await ctx.db
    .query("tokens")
    .withIndex("by_owner_provider", (q) => q.eq("owner", owner).eq("provider", provider))
    .unique();
}

/** Store the token, replacing any (a sign-in). */
export const put = mutation({
  args: { provider: v.string(), ciphertext: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const provider = id(args.provider, "provider");
    const ciphertext = base64(args.ciphertext, "ciphertext");
    const existing = await find(ctx, owner, provider);
    const updated_at = Date.now() / 1000;
    if (existing) await ctx.db.patch(existing._id, { ciphertext, updated_at });
    else await ctx.db.insert("tokens", { owner, provider, ciphertext, updated_at });
    return null;
  },
});

/** Compare-and-swap: replace (or with null, delete) the token only if it still is `expected`.
 * A retry of a swap that already happened answers true: the stored token then equals the new
 * ciphertext, which nobody else can have written (fresh ciphertexts carry random nonces). */
export const swap = mutation({
  args: { provider: v.string(), expected: v.string(), ciphertext: v.union(v.string(), v.null()) },
  returns: v.boolean(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const provider = id(args.provider, "provider");
    const expected = base64(args.expected, "expected");
    const ciphertext = args.ciphertext === null ? null : base64(args.ciphertext, "ciphertext");
    const existing = await find(ctx, owner, provider);
    if (existing === null) return false;
    if (existing.ciphertext !== expected) return ciphertext !== null && existing.ciphertext === ciphertext;
    if (ciphertext === null) await ctx.db.delete(existing._id);
    else await ctx.db.patch(existing._id, { ciphertext, updated_at: Date.now() / 1000 });
    return true;
  },
});

export const get = query({
  args: { provider: v.string() },
  returns: v.union(v.string(), v.null()),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    return (await find(ctx, owner, id(args.provider, "provider")))?.ciphertext ?? null;
  },
});

export const remove = mutation({
  args: { provider: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const existing = await find(ctx, owner, id(args.provider, "provider"));
    if (existing) await ctx.db.delete(existing._id);
    return null;
  },
});

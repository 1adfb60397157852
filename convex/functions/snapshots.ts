// Records of saved sandbox states (the provider's JSON `ref`), newest first.
import { v } from "convex/values";
import { mutation, query } from "./_generated/server";
import { finite, id, int, json } from "./lib/checks";
import { fail } from "./lib/errors";
import { ownSession, requireOwnSession, user } from "./lib/identity";

const snapshotValidator = v.object({
  session_id: v.string(),
  id: v.string(),
  ref: v.string(),
  size: v.number(),
  created_at: v.number(),
});

/** Record a snapshot; the same record again (a retry) is a no-op, another with its id a conflict. */
export const add = mutation({
  args: { snapshot: snapshotValidator },
  returns: v.null(),
  handler: async (ctx, { snapshot }) => {
    const owner = await user(ctx);
    const sid = id(snapshot.id, "snapshot id");
    const ref = json(snapshot.ref, "ref");
    const size = int(snapshot.size, "size");
    const created_at = finite(snapshot.created_at, "created_at");
    const session = await requireOwnSession(ctx, owner, snapshot.session_id);
    const existing = await ctx.db
      .query("snapshots")
      .withIndex("by_session_sid", (q) => q.eq("session", session._id).eq("id", sid))
      .unique();
    if (existing !== null) {
      if (existing.ref === ref && existing.size === size && existing.created_at === created_at) return null;
      fail("conflict", `snapshot ${sid} exists`);
    }
    await ctx.db.insert("snapshots", { session: session._id, id: sid, ref, size, created_at });
    return null;
  },
});

export const list = query({
  args: { session_id: v.string() },
  returns: v.array(snapshotValidator),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const session = await ownSession(ctx, owner, args.session_id);
    if (session === null) return [];
    const snapshots = await ctx.db
      .query("snapshots")
      .withIndex("by_session_created", (q) => q.eq("session", session._id))
      .order("desc")
      .collect();
    return snapshots.map(({ id, ref, size, created_at }) => ({
      session_id: session.id,
      id,
      ref,
      size,
      created_at,
    }));
  },
});

/** Delete one snapshot record; a missing one (or a missing or foreign session): nothing happens. */
export const remove = mutation({
  args: { session_id: v.string(), id: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const session = await ownSession(ctx, owner, args.session_id);
    if (session === null) return null;
    const existing = await ctx.db
      .query("snapshots")
      .withIndex("by_session_sid", (q) => q.eq("session", session._id).eq("id", args.id))
      .unique();
    if (existing) await ctx.db.delete(existing._id);
    return null;
  },
});

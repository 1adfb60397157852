// OpenCode's messages and their parts, as the session last saw them (upserted by id).
import { v } from "convex/values";
import { mutation, query } from "./_generated/server";
import { id, json, text } from "./lib/checks";
import { ownSession, requireOwnSession, user } from "./lib/identity";

export const upsert = mutation({
  args: { session_id: v.string(), message_id: v.string(), role: v.string(), info: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const mid = id(args.message_id, "message_id");
    const role = text(args.role, "role", 200);
    const info = json(args.info, "info");
    const session = await requireOwnSession(ctx, owner, args.session_id);
    const existing = await ctx.db
      .query("messages")
      .withIndex("by_session_mid", (q) => q.eq("session", session._id).eq("id", mid))
      .unique();
    if (existing) await ctx.db.patch(existing._id, { role, info });
    else await ctx.db.insert("messages", { session: session._id, id: mid, role, info });
    return null;
  },
});

/** Upsert a part, keyed by (session, part id) like SQLite: an update changes only its content. */
export const upsertPart = mutation({
  args: { session_id: v.string(), message_id: v.string(), part_id: v.string(), part: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const mid = id(args.message_id, "message_id");
    const pid = id(args.part_id, "part_id");
    const part = json(args.part, "part");
    const session = await requireOwnSession(ctx, owner, args.session_id);
    const existing = await ctx.db
      .query("parts")
      .withIndex("by_session_pid", (q) => q.eq("session", session._id).eq("id", pid))
      .unique();
    if (existing) await ctx.db.patch(existing._id, { part });
    else await ctx.db.insert("parts", { session: session._id, message_id: mid, id: pid, part });
    return null;
  },
});

/** Messages in creation order, each with its parts in creation order. */
export const list = query({
  args: { session_id: v.string() },
  returns: v.array(
    v.object({
      id: v.string(),
      role: v.string(),
      info: v.string(),
      parts: v.array(v.object({ id: v.string(), part: v.string() })),
    }),
  ),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const session = await ownSession(ctx, owner, args.session_id);
    if (session === null) return [];
    const messages = await ctx.db
      .query("messages")
      .withIndex("by_session", (q) => q.eq("session", session._id))
      .collect();
    const out = messages.map((m) => ({ id: m.id, role: m.role, info: m.info, parts: [] as { id: string; part: string }[] }));
    const byId = new Map(out.map((m) => [m.id, m]));
    const parts = await ctx.db
      .query("parts")
      .withIndex("by_session", (q) => q.eq("session", session._id))
      .collect();
    for (const p of parts) byId.get(p.message_id)?.parts.push({ id: p.id, part: p.part });
    return out;
  },
});

// Leases of tabbi server processes (server identity only): the heartbeat, the list every server
// reads to tell live servers from gone ones, and the release that frees a server's sessions.
import { v } from "convex/values";
import type { QueryCtx } from "./_generated/server";
import { mutation, query } from "./_generated/server";
import { finite, id, json } from "./lib/checks";
import { server } from "./lib/identity";

async function find(ctx: QueryCtx, serverId: string) {
  return await ctx.db
    .query("leases")
    .withIndex("by_server", (q) => q.eq("server_id", serverId))
    .unique();
}

const leaseValidator = v.object({
  server_id: v.string(),
  expires_at: v.number(),
  heartbeat_at: v.number(),
  info: v.string(),
});

/** Take or renew a lease. */
export const put = mutation({
  args: leaseValidator,
  returns: v.null(),
  handler: async (ctx, args) => {
    await server(ctx);
    const lease = {
      server_id: id(args.server_id, "server_id"),
      expires_at: finite(args.expires_at, "expires_at"),
      heartbeat_at: finite(args.heartbeat_at, "heartbeat_at"),
      info: json(args.info, "info"),
    };
    const existing = await find(ctx, lease.server_id);
    if (existing) await ctx.db.patch(existing._id, lease);
    else await ctx.db.insert("leases", lease);
    return null;
  },
});

export const list = query({
  args: {},
  returns: v.array(leaseValidator),
  handler: async (ctx) => {
    await server(ctx);
    const leases = await ctx.db.query("leases").collect();
    return leases.map(({ server_id, expires_at, heartbeat_at, info }) => ({
      server_id,
      expires_at,
      heartbeat_at,
      info,
    }));
  },
});

/** End a lease and let go of every session it held, in one transaction. */
export const release = mutation({
  args: { server_id: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    await server(ctx);
    const serverId = id(args.server_id, "server_id");
    const held = await ctx.db
      .query("sessions")
      .withIndex("by_server", (q) => q.eq("server_id", serverId))
      .collect();
    for (const session of held) await ctx.db.patch(session._id, { server_id: null });
    const existing = await find(ctx, serverId);
    if (existing) await ctx.db.delete(existing._id);
    return null;
  },
});

// Sessions: created, read, changed and deleted by their owner; claimed and listed across owners
// only by a server identity (leases, recovery at start-up). See API.md.
import { v } from "convex/values";
import { internal } from "./_generated/api";
import type { Doc, Id } from "./_generated/dataModel";
import type { MutationCtx } from "./_generated/server";
import { internalMutation, mutation, query } from "./_generated/server";
import { finite, id, json, text } from "./lib/checks";
import { fail } from "./lib/errors";
import { caller, ownSession, requireOwnSession, server, sessionById, user } from "./lib/identity";
import { nullableString, sessionFields } from "./schema";

/** A session as callers see it (API.md `Session`). */
export const sessionValidator = v.object(sessionFields);

export function sessionOut(doc: Doc<"sessions">) {
  return {
    id: doc.id,
    owner: doc.owner,
    repo: doc.repo,
    work_branch: doc.work_branch,
    base_branch: doc.base_branch,
    base_commit: doc.base_commit,
    model: doc.model,
    state: doc.state,
    error: doc.error,
    opencode_session_id: doc.opencode_session_id,
    sandbox_state: doc.sandbox_state,
    created_at: doc.created_at,
    updated_at: doc.updated_at,
    server_id: doc.server_id,
  };
}

function optionalText(value: string | null | undefined, what: string): string | null {
  return value === undefined || value === null ? null : text(value, what);
}

export const create = mutation({
  args: {
    session: v.object({
      id: v.string(),
      owner: v.string(),
      repo: v.string(),
      work_branch: v.string(),
      base_branch: v.optional(nullableString),
      base_commit: v.optional(nullableString),
      model: v.optional(nullableString),
      state: v.string(),
      error: v.optional(nullableString),
      opencode_session_id: v.optional(nullableString),
      sandbox_state: v.string(),
      created_at: v.number(),
      server_id: v.optional(nullableString),
    }),
    key: v.optional(nullableString),
  },
  returns: sessionValidator,
  handler: async (ctx, { session, key }) => {
    const owner = await user(ctx);
    if (session.owner !== owner) fail("forbidden", "a user creates sessions only for themselves");
    const sid = id(session.id, "session id");
    const createKey = key === undefined || key === null ? null : id(key, "key");
    const existing = await sessionById(ctx, sid);
    if (existing !== null) {
      if (createKey !== null && existing.create_key === createKey && existing.owner === owner) {
        return sessionOut(existing); // a retry of the create that made it
      }
      fail("conflict", `session ${sid} exists`);
    }
    const now = Date.now() / 1000;
    const created_at = finite(session.created_at, "created_at") || now;
    const _id = await ctx.db.insert("sessions", {
      id: sid,
      owner,
      repo: text(session.repo, "repo"),
      work_branch: text(session.work_branch, "work_branch"),
      base_branch: optionalText(session.base_branch, "base_branch"),
      base_commit: optionalText(session.base_commit, "base_commit"),
      model: optionalText(session.model, "model"),
      state: text(session.state, "state"),
      error: optionalText(session.error, "error"),
      opencode_session_id: optionalText(session.opencode_session_id, "opencode_session_id"),
      sandbox_state: json(session.sandbox_state, "sandbox_state"),
      created_at,
      updated_at: now,
      server_id: session.server_id ? id(session.server_id, "server_id") : null,
      last_seq: 0,
      last_position: 0,
      create_key: createKey,
    });
    return sessionOut((await ctx.db.get(_id))!);
  },
});

/** A user gets their own session; a server any session (to learn its owner and server). */
export const get = query({
  args: { id: v.string() },
  returns: v.union(sessionValidator, v.null()),
  handler: async (ctx, args) => {
    const { role, subject } = await caller(ctx);
    const session =
      role === "server" ? await sessionById(ctx, args.id) : await ownSession(ctx, subject, args.id);
    return session === null ? null : sessionOut(session);
  },
});

/** The caller's sessions, newest first. */
export const list = query({
  args: {},
  returns: v.array(sessionValidator),
  handler: async (ctx) => {
    const owner = await user(ctx);
    const sessions = await ctx.db
      .query("sessions")
      .withIndex("by_owner", (q) => q.eq("owner", owner))
      .order("desc")
      .collect();
    return sessions.map(sessionOut);
  },
});

/** Every session of every owner, newest first, a page at a time (server: recovery). */
export const listAll = query({
  args: { cursor: v.union(v.string(), v.null()), num_items: v.number() },
  returns: v.object({
    page: v.array(sessionValidator),
    is_done: v.boolean(),
    continue_cursor: v.string(),
  }),
  handler: async (ctx, args) => {
    await server(ctx);
    if (!Number.isSafeInteger(args.num_items) || args.num_items < 1 || args.num_items > 200) {
      fail("invalid", "num_items must be an integer in 1..200");
    }
    const result = await ctx.db
      .query("sessions")
      .withIndex("by_created")
      .order("desc")
      .paginate({ cursor: args.cursor, numItems: args.num_items });
    return {
      page: result.page.map(sessionOut),
      is_done: result.isDone,
      continue_cursor: result.continueCursor,
    };
  },
});

export const update = mutation({
  args: {
    id: v.string(),
    fields: v.object({
      state: v.optional(v.string()),
      base_commit: v.optional(nullableString),
      error: v.optional(nullableString),
      opencode_session_id: v.optional(nullableString),
      sandbox_state: v.optional(v.string()),
      model: v.optional(nullableString),
    }),
  },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const session = await requireOwnSession(ctx, owner, args.id);
    const f = args.fields;
    const patch: Partial<Doc<"sessions">> = { updated_at: Date.now() / 1000 };
    if (f.state !== undefined) patch.state = text(f.state, "state");
    if (f.base_commit !== undefined) patch.base_commit = optionalText(f.base_commit, "base_commit");
    if (f.error !== undefined) patch.error = optionalText(f.error, "error");
    if (f.opencode_session_id !== undefined) {
      patch.opencode_session_id = optionalText(f.opencode_session_id, "opencode_session_id");
    }
    if (f.sandbox_state !== undefined) patch.sandbox_state = json(f.sandbox_state, "sandbox_state");
    if (f.model !== undefined) patch.model = optionalText(f.model, "model");
    await ctx.db.patch(session._id, patch);
    return null;
  },
});

/** How many children one mutation deletes before it leaves the rest to a scheduled one. */
const PURGE_BUDGET = 1000;

type Child = (ctx: MutationCtx, session: Id<"sessions">, n: number) => Promise<{ _id: Id<any> }[]>;

const CHILDREN: Child[] = [
  (ctx, s, n) => ctx.db.query("events").withIndex("by_session_seq", (q) => q.eq("session", s)).take(n),
  (ctx, s, n) =>
    ctx.db.query("prompts").withIndex("by_session_status_position", (q) => q.eq("session", s)).take(n),
  (ctx, s, n) => ctx.db.query("messages").withIndex("by_session", (q) => q.eq("session", s)).take(n),
  (ctx, s, n) => ctx.db.query("parts").withIndex("by_session", (q) => q.eq("session", s)).take(n),
  (ctx, s, n) =>
    ctx.db.query("snapshots").withIndex("by_session_created", (q) => q.eq("session", s)).take(n),
];

/** Delete up to `budget` children of a deleted session; true when none is left. */
async function purgeChildren(ctx: MutationCtx, session: Id<"sessions">, budget: number) {
  let left = budget;
  for (const child of CHILDREN) {
    const docs = await child(ctx, session, left + 1);
    for (const doc of docs.slice(0, left)) await ctx.db.delete(doc._id);
    if (docs.length > left) return false;
    left -= docs.length;
  }
  return true;
}

/** Delete the session and everything of it. The row goes now, so from outside the deletion is
 * all-or-nothing (children are reached only through it); children beyond the budget are deleted
 * by scheduled mutations. A missing or foreign session: nothing happens. */
export const remove = mutation({
  args: { id: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const session = await ownSession(ctx, owner, args.id);
    if (session === null) return null;
    await ctx.db.delete(session._id);
    if (!(await purgeChildren(ctx, session._id, PURGE_BUDGET))) {
      await ctx.scheduler.runAfter(0, internal.sessions.purge, { session: session._id });
    }
    return null;
  },
});

export const purge = internalMutation({
  args: { session: v.id("sessions") },
  returns: v.null(),
  handler: async (ctx, args) => {
    if (!(await purgeChildren(ctx, args.session, PURGE_BUDGET))) {
      await ctx.scheduler.runAfter(0, internal.sessions.purge, args);
    }
    return null;
  },
});

/** Compare-and-swap of the server that runs a session. True also when it already is `server_id`
 * (a retried claim that happened). */
export const claim = mutation({
  args: { id: v.string(), server_id: v.string(), expected: v.union(v.string(), v.null()) },
  returns: v.boolean(),
  handler: async (ctx, args) => {
    await server(ctx);
    const serverId = id(args.server_id, "server_id");
    const session = await sessionById(ctx, args.id);
    if (session === null) return false;
    if (session.server_id === serverId) return true;
    if (session.server_id !== args.expected) return false;
    await ctx.db.patch(session._id, { server_id: serverId });
    return true;
  },
});

// A session's prompt queue. Positions are assigned like events' seqs: from the session row's
// `last_position`, bumped in the same mutation. The prompt id is the idempotency key.
import { v } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import { mutation, query } from "./_generated/server";
import { finite, id, json, promptStatus, text } from "./lib/checks";
import { fail } from "./lib/errors";
import { ownSession, requireOwnSession, user } from "./lib/identity";

const promptValidator = v.object({
  id: v.string(),
  session_id: v.string(),
  text: v.string(),
  status: v.string(),
  created_at: v.number(),
  position: v.number(),
  attachments: v.optional(v.string()),
});

function promptOut(doc: Doc<"prompts">) {
  const { id, session_id, text, status, created_at, position, attachments } = doc;
  return { id, session_id, text, status, created_at, position, ...(attachments === undefined ? {} : { attachments }) };
}

/** Queue a prompt with the next position. The same prompt again (a retry) gets its first result;
 * the same id with different content is a conflict. */
export const enqueue = mutation({
  args: {
    prompt: v.object({
      id: v.string(),
      session_id: v.string(),
      text: v.string(),
      status: v.string(),
      created_at: v.number(),
      // What the person attached: JSON text of [{kind, label, content, truncated}] (API.md).
      attachments: v.optional(v.string()),
    }),
  },
  returns: promptValidator,
  handler: async (ctx, { prompt }) => {
    const owner = await user(ctx);
    const pid = id(prompt.id, "prompt id");
    const body = text(prompt.text, "text");
    const status = promptStatus(prompt.status);
    const created_at = finite(prompt.created_at, "created_at");
    const attachments = prompt.attachments === undefined ? undefined : json(prompt.attachments, "attachments");
    const session = await requireOwnSession(ctx, owner, prompt.session_id);
    const existing = await ctx.db
      .query("prompts")
      .withIndex("by_pid", (q) => q.eq("id", pid))
      .unique();
    if (existing !== null) {
      if (existing.session === session._id && existing.text === body && existing.created_at === created_at &&
          existing.attachments === attachments) {
        return promptOut(existing);
      }
      fail("conflict", `prompt ${pid} exists`);
    }
    const position = session.last_position + 1;
    await ctx.db.patch(session._id, { last_position: position });
    const _id = await ctx.db.insert("prompts", {
      session: session._id,
      id: pid,
      session_id: session.id,
      position,
      text: body,
      status,
      created_at,
      ...(attachments === undefined ? {} : { attachments }),
    });
    return promptOut((await ctx.db.get(_id))!);
  },
});

/** Prompts not yet finished (queued or running), in delivery order. */
export const pending = query({
  args: { session_id: v.string() },
  returns: v.array(promptValidator),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const session = await ownSession(ctx, owner, args.session_id);
    if (session === null) return [];
    const byStatus = await Promise.all(
      ["queued", "running"].map((status) =>
        ctx.db
          .query("prompts")
          .withIndex("by_session_status_position", (q) => q.eq("session", session._id).eq("status", status))
          .collect(),
      ),
    );
    return byStatus
      .flat()
      .sort((a, b) => a.position - b.position)
      .map(promptOut);
  },
});

export const setStatus = mutation({
  args: { id: v.string(), status: v.string() },
  returns: v.null(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const status = promptStatus(args.status);
    const prompt = await ctx.db
      .query("prompts")
      .withIndex("by_pid", (q) => q.eq("id", args.id))
      .unique();
    const session = prompt === null ? null : await ctx.db.get(prompt.session);
    if (prompt === null || session === null || session.owner !== owner) {
      fail("not_found", `no prompt ${args.id}`);
    }
    await ctx.db.patch(prompt._id, { status });
    return null;
  },
});

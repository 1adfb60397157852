// A session's append-only event log. Sequence numbers are assigned here, inside the mutation,
// from the session row's `last_seq`, which the same mutation bumps: two concurrent appends both
// write that row, so Convex's optimistic concurrency re-runs one of them and the log stays
// 1, 2, 3 ... with no gap and no duplicate, whoever appends.
import { v } from "convex/values";
import type { Doc } from "./_generated/dataModel";
import { mutation, query } from "./_generated/server";
import { finite, id, int, json, text, utf8Over } from "./lib/checks";
import { fail } from "./lib/errors";
import { ownSession, requireOwnSession, user } from "./lib/identity";

/** The most events one append takes, and the most bytes of event data (a transaction writes at
 * most 16 MiB): the store splits bigger batches, a key per part. */
export const MAX_BATCH = 500;
export const MAX_BATCH_BYTES = 8_000_000;
export const MAX_LIST = 1000;

const eventValidator = v.object({ seq: v.number(), type: v.string(), data: v.string(), ts: v.number() });

function eventOut(doc: Doc<"events">) {
  return { seq: doc.seq, type: doc.type, data: doc.data, ts: doc.ts };
}

/** Append a batch, numbered with the next seqs. `key` makes retries safe: a batch already
 * appended under this key is returned as it was, and nothing is written again. */
export const append = mutation({
  args: {
    session_id: v.string(),
    key: v.string(),
    events: v.array(v.object({ type: v.string(), data: v.string(), ts: v.number() })),
  },
  returns: v.array(eventValidator),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const key = id(args.key, "key");
    if (args.events.length > MAX_BATCH) fail("invalid", `at most ${MAX_BATCH} events per append`);
    const events = args.events.map((e, n) => ({
      type: text(e.type, `events[${n}].type`, 200),
      data: json(e.data, `events[${n}].data`),
      ts: finite(e.ts, `events[${n}].ts`),
    }));
    if (utf8Over(events.map((e) => e.data).join(""), MAX_BATCH_BYTES)) {
      fail("invalid", `at most ${MAX_BATCH_BYTES} bytes of event data per append`);
    }
    const session = await requireOwnSession(ctx, owner, args.session_id);
    if (events.length === 0) return [];
    const earlier = await ctx.db
      .query("events")
      .withIndex("by_session_key", (q) => q.eq("session", session._id).eq("key", key))
      .take(MAX_BATCH + 1);
    if (earlier.length > 0) {
      const same =
        earlier.length === events.length &&
        earlier.every((e, n) => e.type === events[n].type && e.data === events[n].data && e.ts === events[n].ts);
      if (!same) fail("conflict", `key ${key} was used for another batch`);
      return earlier.map(eventOut);
    }
    const first = session.last_seq + 1;
    const stored = events.map((e, n) => ({ ...e, seq: first + n }));
    for (const e of stored) await ctx.db.insert("events", { session: session._id, key, ...e });
    await ctx.db.patch(session._id, { last_seq: first + stored.length - 1 });
    return stored.map(({ seq, type, data, ts }) => ({ seq, type, data, ts }));
  },
});

/** Events with seq > after, in seq order, at most `limit`. */
export const list = query({
  args: { session_id: v.string(), after: v.number(), limit: v.number() },
  returns: v.array(eventValidator),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    const after = int(args.after, "after");
    const limit = int(args.limit, "limit", 1, MAX_LIST);
    const session = await ownSession(ctx, owner, args.session_id);
    if (session === null) return [];
    const events = await ctx.db
      .query("events")
      .withIndex("by_session_seq", (q) => q.eq("session", session._id).gt("seq", after))
      .take(limit);
    return events.map(eventOut);
  },
});

export const lastSeq = query({
  args: { session_id: v.string() },
  returns: v.number(),
  handler: async (ctx, args) => {
    const owner = await user(ctx);
    return (await ownSession(ctx, owner, args.session_id))?.last_seq ?? 0;
  },
});

// Everything tabbi persists in Convex, and an index for every query the functions run.
//
// Children of a session (events, prompts, messages, parts, snapshots) point at the session's
// document id, not its `id` string: a session deleted and created again with the same `id` never
// sees the old children, and every read of a child goes through the session row (its owner).
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";

export const nullableString = v.union(v.string(), v.null());

/** A session's fields as callers see them (API.md `Session`); the table adds its counters. */
export const sessionFields = {
  id: v.string(),
  owner: v.string(),
  repo: v.string(),
  work_branch: v.string(),
  base_branch: nullableString,
  base_commit: nullableString,
  model: nullableString,
  state: v.string(),
  error: nullableString,
  opencode_session_id: nullableString,
  sandbox_state: v.string(), // JSON text
  created_at: v.number(),
  updated_at: v.number(),
  server_id: nullableString,
};

export default defineSchema({
  users: defineTable({
    username: v.string(),
    profile: v.string(), // JSON text
    updated_at: v.number(),
  }).index("by_username", ["username"]),

  sessions: defineTable({
    ...sessionFields,
    // The log's and the prompt queue's high-water marks: bumped in the same mutation that
    // writes, so two writers conflict on this row and Convex re-runs one of them.
    last_seq: v.number(),
    last_position: v.number(),
    // The idempotency key of the create that made it (a retried create returns the row).
    create_key: nullableString,
  })
    .index("by_sid", ["id"])
    .index("by_owner", ["owner", "created_at"])
    .index("by_created", ["created_at"])
    .index("by_server", ["server_id"]),

  events: defineTable({
    session: v.id("sessions"),
    seq: v.number(),
    type: v.string(),
    data: v.string(), // JSON text
    ts: v.number(),
    // The idempotency key of the append that wrote it (one per batch).
    key: v.string(),
  })
    .index("by_session_seq", ["session", "seq"])
    .index("by_session_key", ["session", "key", "seq"]),

  prompts: defineTable({
    session: v.id("sessions"),
    id: v.string(),
    session_id: v.string(),
    position: v.number(),
    text: v.string(),
    status: v.string(),
    created_at: v.number(),
    attachments: v.optional(v.string()), // JSON text: [{kind, label, content, truncated}]
  })
    .index("by_pid", ["id"])
    .index("by_session_status_position", ["session", "status", "position"]),

  messages: defineTable({
    session: v.id("sessions"),
    id: v.string(),
    role: v.string(),
    info: v.string(), // JSON text
  })
    // Index fields end with _creationTime, so this lists a session's messages in creation order.
    .index("by_session", ["session"])
    .index("by_session_mid", ["session", "id"]),

  parts: defineTable({
    session: v.id("sessions"),
    message_id: v.string(),
    id: v.string(),
    part: v.string(), // JSON text
  })
    .index("by_session", ["session"])
    .index("by_session_pid", ["session", "id"]),

  snapshots: defineTable({
    session: v.id("sessions"),
    id: v.string(),
    ref: v.string(), // JSON text
    size: v.number(),
    created_at: v.number(),
  })
    .index("by_session_created", ["session", "created_at"])
    .index("by_session_sid", ["session", "id"]),

  tokens: defineTable({
    owner: v.string(),
    provider: v.string(),
    ciphertext: v.string(), // base64
    updated_at: v.number(),
  }).index("by_owner_provider", ["owner", "provider"]),

  // Spend of a deleted session, still counted by its owner's budgets: one row per (owner,
  // session id), kept when the session and its children go (spend.ts).
  retired_spend: defineTable({
    owner: v.string(),
    session_id: v.string(),
    cost: v.number(),
    seconds: v.number(),
    retired_at: v.number(),
  })
    .index("by_owner_session", ["owner", "session_id"])
    .index("by_session", ["session_id"]),

  leases: defineTable({
    server_id: v.string(),
    expires_at: v.number(),
    heartbeat_at: v.number(),
    info: v.string(), // JSON text
  }).index("by_server", ["server_id"]),
});

// Who is calling, from the JWT Convex verified (see auth.config.ts and API.md "Identities").
//
// The role comes from the verified issuer, never from a claim the token could carry: user tokens
// are issued by TABBI_JWT_ISSUER, server tokens by TABBI_JWT_ISSUER + "/server" (checked against
// their own key set). A user's rows are those whose owner is the token's subject.
import type { Doc } from "../_generated/dataModel";
import type { QueryCtx } from "../_generated/server";
import { fail } from "./errors";

export type Role = "user" | "server";

export const SERVER_ISSUER_SUFFIX = "/server";

function issuers(): { user: string; server: string } {
  const user = process.env.TABBI_JWT_ISSUER;
  if (!user) fail("forbidden", "the deployment has no TABBI_JWT_ISSUER: no identity is accepted");
  return { user, server: user + SERVER_ISSUER_SUFFIX };
}

/** The caller's role and subject; refuses anonymous callers and unknown issuers. */
export async function caller(ctx: QueryCtx): Promise<{ role: Role; subject: string }> {
  const identity = await ctx.auth.getUserIdentity();
  if (identity === null) fail("unauthenticated", "no identity: send Authorization: Bearer <JWT>");
  const { user, server } = issuers();
  if (!identity.subject) fail("forbidden", "the token has no subject");
  if (identity.issuer === user) return { role: "user", subject: identity.subject };
  if (identity.issuer === server) return { role: "server", subject: identity.subject };
  return fail("forbidden", "tokens of this issuer may not call tabbi's functions");
}

/** The calling user's name; servers are refused (they may not touch users' content). */
export async function user(ctx: QueryCtx): Promise<string> {
  const { role, subject } = await caller(ctx);
  if (role !== "user") fail("forbidden", "only a user identity may call this function");
  return subject;
}

/** Refuses everyone but a server identity (leases, claims, recovery). */
export async function server(ctx: QueryCtx): Promise<string> {
  const { role, subject } = await caller(ctx);
  if (role !== "server") fail("forbidden", "only a server identity may call this function");
  return subject;
}

/** The session with this `id`, whoever owns it (for the functions' own checks). */
export async function sessionById(ctx: QueryCtx, id: string): Promise<Doc<"sessions"> | null> {
  return await ctx.db
    .query("sessions")
    .withIndex("by_sid", (q) => q.eq("id", id))
    .unique();
}

/** The caller's own session, or null when it is missing or someone else's (indistinguishable). */
export async function ownSession(
  ctx: QueryCtx,
  owner: string,
  id: string,
): Promise<Doc<"sessions"> | null> {
  const session = await sessionById(ctx, id);
  return session !== null && session.owner === owner ? session : null;
}

/** The caller's own session, or `not_found` (for writes, which need it to exist). */
export async function requireOwnSession(
  ctx: QueryCtx,
  owner: string,
  id: string,
): Promise<Doc<"sessions">> {
  return (await ownSession(ctx, owner, id)) ?? fail("not_found", `no session ${id}`);
}

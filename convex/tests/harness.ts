// One fresh in-memory deployment per test, with the identities the tests act as.
import { convexTest } from "convex-test";
import { expect } from "vitest";
import schema from "../functions/schema";

export const modules = import.meta.glob("../functions/**/*.*s");
export const ISSUER = "https://tabbi.test";

export function deployment() {
  const t = convexTest(schema, modules);
  const as = (subject: string, issuer = ISSUER) =>
    t.withIdentity({ subject, issuer, tokenIdentifier: `${issuer}|${subject}` });
  return {
    t,
    alice: as("alice"),
    bob: as("bob"),
    server: as("srv-a", `${ISSUER}/server`),
    /** A token of an issuer the deployment trusts for nothing of tabbi's. */
    stranger: as("alice", "https://elsewhere.test"),
    as,
  };
}

/** The ConvexError code a call is refused with. */
export async function refused(call: Promise<unknown>): Promise<string> {
  const error = await call.then(
    () => expect.fail("the call was not refused"),
    (e: unknown) => e,
  );
  const data = (error as { data?: { code?: string } }).data;
  expect(data, String(error)).toBeTypeOf("object");
  return data!.code!;
}

export function session(id: string, owner = "alice", extra: Record<string, unknown> = {}) {
  return {
    id,
    owner,
    repo: "/r",
    work_branch: "tabbi/x",
    state: "idle",
    sandbox_state: "{}",
    created_at: 0,
    ...extra,
  };
}

export const ev = (type = "text.delta", data: unknown = {}, ts = 100) => ({
  type,
  data: JSON.stringify(data),
  ts,
});

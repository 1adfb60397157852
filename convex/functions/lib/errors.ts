// The refusals callers can tell apart. Convex passes only a ConvexError's data to the caller
// (a plain Error becomes "Server Error" in production), so every refusal is one of these.
import { ConvexError } from "convex/values";

export type ErrorCode = "unauthenticated" | "forbidden" | "not_found" | "conflict" | "invalid";

export function fail(code: ErrorCode, message: string): never {
  throw new ConvexError({ code, message });
}

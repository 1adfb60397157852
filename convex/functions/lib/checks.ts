// Input rules beyond what Convex's argument validators say (see API.md "Wire format"): values
// are checked at the edge, so a bad one is refused as `invalid` instead of being stored.
import { fail } from "./errors";

/** The longest string the functions accept, in UTF-8 bytes: a Convex document is at most 1 MiB,
 * and the rest of the document needs room. */
export const MAX_TEXT = 900_000;
export const MAX_ID = 200;

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

/** Whether UTF-8 needs more than ``max`` bytes for a well-formed string (at most 3 per UTF-16 unit: encoded only
 * when that bound is over ``max``). */
export function utf8Over(value: string, max: number): boolean {
  return value.length > max || (value.length * 3 > max && new TextEncoder().encode(value).length > max);
}

/** A string that UTF-8 can carry (no lone surrogate), of at most ``max`` bytes of UTF-8. */
export function text(value: string, what: string, max: number = MAX_TEXT): string {
  if (LONE_SURROGATE.test(value)) fail("invalid", `${what} is not well-formed text`);
  if (utf8Over(value, max)) {
    fail("invalid", `${what} is longer than ${max} bytes`);
  }
  return value;
}

/** A non-empty id of at most MAX_ID characters. */
export function id(value: string, what: string): string {
  if (value.length === 0) fail("invalid", `${what} is empty`);
  return text(value, what, MAX_ID);
}

/** JSON text (an opaque dict the store serialised). */
export function json(value: string, what: string): string {
  text(value, what);
  try {
    JSON.parse(value);
  } catch {
    fail("invalid", `${what} is not JSON text`);
  }
  return value;
}

/** An integer in min..max (both within 0..2^53-1). */
export function int(value: number, what: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    fail("invalid", `${what} must be an integer in ${min}..${max}`);
  }
  return value;
}

/** A finite number (a timestamp). */
export function finite(value: number, what: string): number {
  if (!Number.isFinite(value)) fail("invalid", `${what} must be a finite number`);
  return value;
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Standard, padded base64 (encrypted bytes). */
export function base64(value: string, what: string): string {
  if (value.length > MAX_TEXT || !BASE64.test(value)) fail("invalid", `${what} is not base64`);
  return value;
}

export const PROMPT_STATUSES = ["queued", "running", "done", "failed"] as const;

export function promptStatus(value: string): string {
  if (!(PROMPT_STATUSES as readonly string[]).includes(value)) {
    fail("invalid", `unknown prompt status ${JSON.stringify(value)}`);
  }
  return value;
}

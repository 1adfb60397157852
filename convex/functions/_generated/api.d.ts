/* eslint-disable */
/**
 * Generated `api` utility.
 *
 * THIS CODE IS AUTOMATICALLY GENERATED.
 *
 * To regenerate, run `npx convex dev`.
 * @module
 */

import type {
  ApiFromModules,
  FilterApi,
  FunctionReference,
} from "convex/server";
import type * as events from "../events.js";
import type * as health from "../health.js";
import type * as leases from "../leases.js";
import type * as lib_checks from "../lib/checks.js";
import type * as lib_errors from "../lib/errors.js";
import type * as lib_identity from "../lib/identity.js";
import type * as messages from "../messages.js";
import type * as prompts from "../prompts.js";
import type * as sessions from "../sessions.js";
import type * as snapshots from "../snapshots.js";
import type * as spend from "../spend.js";
import type * as tokens from "../tokens.js";
import type * as users from "../users.js";

/**
 * A utility for referencing Convex functions in your app's API.
 *
 * Usage:
 * ```js
 * const myFunctionReference = api.myModule.myFunction;
 * ```
 */
declare const fullApi: ApiFromModules<{
  events: typeof events;
  health: typeof health;
  leases: typeof leases;
  "lib/checks": typeof lib_checks;
  "lib/errors": typeof lib_errors;
  "lib/identity": typeof lib_identity;
  messages: typeof messages;
  prompts: typeof prompts;
  sessions: typeof sessions;
  snapshots: typeof snapshots;
  spend: typeof spend;
  tokens: typeof tokens;
  users: typeof users;
}>;
export declare const api: FilterApi<
  typeof fullApi,
  FunctionReference<any, "public">
>;
export declare const internal: FilterApi<
  typeof fullApi,
  FunctionReference<any, "internal">
>;

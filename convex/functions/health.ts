import { v } from "convex/values";
import { query } from "./_generated/server";

/** The store's health check: true whenever the deployment answers (no identity needed, no data). */
export const ping = query({
  args: {},
  returns: v.boolean(),
  handler: async () => true,
});

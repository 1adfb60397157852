import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    environment: "edge-runtime",
    server: { deps: { inline: ["convex-test"] } },
    include: ["tests/**/*.test.ts"],
    // The machine running the suite is a loaded 2-core VM: a deadline for hangs, not for speed.
    testTimeout: 60_000,
    // The deployment settings the functions read (auth.config.ts, lib/identity.ts).
    env: { TABBI_JWT_ISSUER: "https://tabbi.test" },
  },
});

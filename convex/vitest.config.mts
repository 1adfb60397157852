import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    environment: "edge-runtime",
    server: { deps: { inline: ["convex-test"] } },
    include: ["tests/**/*.test.ts"],
    // The deployment settings the functions read (auth.config.ts, lib/identity.ts).
    env: { TABBI_JWT_ISSUER: "https://tabbi.test" },
  },
});

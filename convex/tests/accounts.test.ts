// Users and their encrypted tokens: keyed by the token's subject, never by an argument.
import { describe, expect, test } from "vitest";
import { api } from "../functions/_generated/api";
import { deployment, refused } from "./harness";

describe("users", () => {
  test("a user reads and writes only their own profile", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.users.upsert, { profile: '{"name":"Alice"}' });
    await alice.mutation(api.users.upsert, { profile: '{"name":"Alice A."}' });
    expect(await alice.query(api.users.get, {})).toBe('{"name":"Alice A."}');
    expect(await bob.query(api.users.get, {})).toBeNull();
    expect(await refused(alice.mutation(api.users.upsert, { profile: "{" }))).toBe("invalid");
  });
});

describe("tokens", () => {
  test("put replaces, get, remove", async () => {
    const { alice } = deployment();
    await alice.mutation(api.tokens.put, { provider: "github", ciphertext: "AGNpcGhlcg==" });
    await alice.mutation(api.tokens.put, { provider: "github", ciphertext: "AW5ld2Vy" });
    expect(await alice.query(api.tokens.get, { provider: "github" })).toBe("AW5ld2Vy");
    await alice.mutation(api.tokens.remove, { provider: "github" });
    expect(await alice.query(api.tokens.get, { provider: "github" })).toBeNull();
    expect(await refused(alice.mutation(api.tokens.put, { provider: "github", ciphertext: "not base64!" }))).toBe("invalid");
  });

  test("compare-and-swap: only the holder of the current token replaces or deletes it; a retry of a swap that happened is true", async () => {
    const { alice } = deployment();
    const swap = (expected: string, ciphertext: string | null) =>
      alice.mutation(api.tokens.swap, { provider: "github", expected, ciphertext });
    expect(await swap("b2xk", "bmV3")).toBe(false); // nothing stored
    await alice.mutation(api.tokens.put, { provider: "github", ciphertext: "djE=" });
    expect(await swap("djE=", "djI=")).toBe(true);
    expect(await swap("djE=", "djItb3RoZXI=")).toBe(false); // lost the race
    expect(await swap("djE=", "djI=")).toBe(true); // our own swap, retried
    expect(await alice.query(api.tokens.get, { provider: "github" })).toBe("djI=");
    expect(await swap("c3RhbGU=", null)).toBe(false);
    expect(await swap("djI=", null)).toBe(true);
    expect(await alice.query(api.tokens.get, { provider: "github" })).toBeNull();
    expect(await swap("djI=", null)).toBe(false);
  });

  test("user B can neither read, replace, swap nor delete user A's token", async () => {
    const { alice, bob } = deployment();
    await alice.mutation(api.tokens.put, { provider: "github", ciphertext: "c2VjcmV0" });
    expect(await bob.query(api.tokens.get, { provider: "github" })).toBeNull();
    expect(await bob.mutation(api.tokens.swap, { provider: "github", expected: "c2VjcmV0", ciphertext: "ZXZpbA==" })).toBe(false);
    await bob.mutation(api.tokens.remove, { provider: "github" });
    await bob.mutation(api.tokens.put, { provider: "github", ciphertext: "Ym9i" });
    expect(await alice.query(api.tokens.get, { provider: "github" })).toBe("c2VjcmV0");
    expect(await bob.query(api.tokens.get, { provider: "github" })).toBe("Ym9i");
  });
});

// Which JWTs Convex accepts (docs/deploy-convex.md). Two custom-JWT providers, both signed by the
// tabbi deployment with ES256 and addressed to one application id:
//
// - user tokens: iss = TABBI_JWT_ISSUER, sub = the Jupyter user name, keys in TABBI_JWT_JWKS;
// - server tokens: iss = TABBI_JWT_ISSUER + "/server", sub = the server's lease id, keys in
//   TABBI_SERVER_JWT_JWKS (defaults to the user key set).
//
// The functions tell the roles apart by the verified issuer (lib/identity.ts). A JWKS is a URL
// Convex fetches, or a `data:` URI holding the key set itself.
import type { AuthConfig } from "convex/server";

const issuer = process.env.TABBI_JWT_ISSUER!;
const applicationID = process.env.TABBI_JWT_APPLICATION_ID || "tabbi";

export default {
  providers: [
    {
      type: "customJwt",
      issuer,
      jwks: process.env.TABBI_JWT_JWKS!,
      algorithm: "ES256",
      applicationID,
    },
    {
      type: "customJwt",
      issuer: `${issuer}/server`,
      jwks: process.env.TABBI_SERVER_JWT_JWKS || process.env.TABBI_JWT_JWKS!,
      algorithm: "ES256",
      applicationID,
    },
  ],
} satisfies AuthConfig;

// A loopback stand-in of a Convex deployment's HTTP API, for the Python ConvexStore's tests.
//
// It runs tabbi's real functions (convex/functions/) through convex-test, in one in-memory
// deployment that lives as long as this process, and answers like Convex does:
//   POST /api/query | /api/mutation | /api/action  {"path", "args", "format"}
//   200 {"status": "success", "value"}            the function returned
//   560 {"status": "error", "errorMessage", "errorData"?}   the function threw (ConvexError: data)
//   400 {"code", "message"}                       a malformed request
//   401 {"code", "message"}                       the JWT was refused (before any function ran)
// Bearer JWTs are checked as the deployment's auth config (functions/auth.config.ts) says: the
// provider matching iss and aud, the algorithm, the signature against the provider's JWKS, exp.
// Unknown and internal functions are refused with Convex's own message. What it does not
// implement (deploy-key auth, other endpoints, other formats) it refuses and logs to stderr.
//
// Switches for the tests (loopback, need X-Standin-Admin: $STANDIN_ADMIN_TOKEN):
//   POST /_standin/faults {latency_ms, error_rate, fail_next, status, error_phase, outage, no_answer}
//   GET  /_standin/stats   POST /_standin/reset
//
// Started by tests/support/convex_standin/__init__.py with tsx; prints "listening <port>".
import { createPublicKey, verify as verifySignature, type JsonWebKey } from "node:crypto";
import { readdirSync, statSync } from "node:fs";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const CONVEX_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "../../../convex");
const FUNCTIONS_DIR = join(CONVEX_DIR, "functions");

/** Import from convex/node_modules (this file is outside that package, so bare names would not
 * resolve); the ESM builds, the same instances the functions import. */
const dep = (path: string) => import(pathToFileURL(join(CONVEX_DIR, "node_modules", path)).href);
const { convexTest } = await dep("convex-test/dist/index.js");
const { makeFunctionReference } = await dep("convex/dist/esm/server/index.js");
const { jsonToConvex, convexToJson } = await dep("convex/dist/esm/values/index.js");

const log = (...parts: unknown[]) => console.error("convex-standin:", ...parts);

// -- the deployment --------------------------------------------------------------------------
/** The function modules as an explicit map, the way convex-test wants them (keys relative to the
 * functions folder, `_generated/` included): every file Convex would bundle, and the generated
 * api. */
function moduleMap(): Record<string, () => Promise<any>> {
  const map: Record<string, () => Promise<any>> = {};
  const walk = (dir: string) => {
    for (const name of readdirSync(dir).sort()) {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) walk(path);
      else if (/\.(ts|js)$/.test(name) && !name.endsWith(".d.ts")) {
        map["./" + relative(FUNCTIONS_DIR, path)] = () => import(pathToFileURL(path).href);
      }
    }
  };
  walk(FUNCTIONS_DIR);
  return map;
}

const modules = moduleMap();
const schema = (await import(pathToFileURL(join(FUNCTIONS_DIR, "schema.ts")).href)).default;
let t = convexTest(schema, modules);

// -- auth, as auth.config.ts says ------------------------------------------------------------
type Provider = { type?: string; issuer?: string; domain?: string; jwks?: string; algorithm?: string; applicationID?: string };
const authConfig: { providers: Provider[] } = (
  await import(pathToFileURL(join(FUNCTIONS_DIR, "auth.config.ts")).href)
).default;
for (const p of authConfig.providers) {
  if (p.type !== "customJwt") log("not implemented: OIDC provider", p.domain, "(its tokens are refused)");
}

const jwksCache = new Map<string, JsonWebKey[]>();
async function jwks(url: string): Promise<JsonWebKey[]> {
  let keys = jwksCache.get(url);
  if (keys === undefined) {
    // A `data:` URI holds the key set itself; a URL is fetched (and cached, as Convex does).
    keys = (JSON.parse(await (await fetch(url)).text()).keys ?? []) as JsonWebKey[];
    jwksCache.set(url, keys);
  }
  return keys;
}

class AuthError extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

const UNVERIFIED =
  "Could not verify OIDC token claim. Check that the token signature is valid and the token hasn't expired.";

function b64json(part: string): any {
  return JSON.parse(Buffer.from(part, "base64url").toString("utf8"));
}

/** The identity of a Bearer JWT, checked as Convex checks a custom-JWT provider's tokens. */
async function identityOf(token: string): Promise<Record<string, unknown>> {
  const parts = token.split(".");
  let header: any, payload: any;
  try {
    if (parts.length !== 3) throw new Error("not three parts");
    header = b64json(parts[0]);
    payload = b64json(parts[1]);
    for (const part of [header, payload]) {
      if (typeof part !== "object" || part === null || Array.isArray(part)) throw new Error("not an object");
    }
  } catch {
    throw new AuthError("InvalidAuthHeader", "Could not parse JWT payload. Check that the token is a valid JWT format with three base64-encoded parts separated by dots.");
  }
  const audiences = Array.isArray(payload.aud) ? payload.aud : payload.aud === undefined ? [] : [payload.aud];
  const provider = authConfig.providers.find(
    (p) =>
      p.type === "customJwt" &&
      p.issuer === payload.iss &&
      (p.applicationID === undefined || audiences.includes(p.applicationID)),
  );
  if (provider === undefined) {
    throw new AuthError("NoAuthProvider", "No auth provider found matching the given token. Check that your JWT's issuer and audience match one of your configured providers.");
  }
  // Convex requires the header fields kid, alg and typ, and one audience at most.
  if (audiences.length > 1 || header.alg !== provider.algorithm || typeof header.kid !== "string"
      || typeof header.typ !== "string") {
    throw new AuthError("Unauthenticated", UNVERIFIED);
  }
  const candidates = (await jwks(provider.jwks!)).filter((k) => k.kid === header.kid);
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`);
  const signature = Buffer.from(parts[2], "base64url");
  const valid = candidates.some((jwk) => {
    try {
      const key = createPublicKey({ key: jwk, format: "jwk" });
      return header.alg === "ES256"
        ? verifySignature("sha256", signed, { key, dsaEncoding: "ieee-p1363" }, signature)
        : verifySignature("sha256", signed, key, signature);
    } catch {
      return false;
    }
  });
  const now = Date.now() / 1000;
  if (!valid || typeof payload.exp !== "number" || payload.exp <= now
      || (typeof payload.nbf === "number" && payload.nbf > now + 60)
      || typeof payload.sub !== "string") {
    throw new AuthError("Unauthenticated", UNVERIFIED);
  }
  const { iss, sub, aud: _aud, exp: _exp, iat: _iat, nbf: _nbf, ...claims } = payload;
  return { ...claims, subject: sub, issuer: iss, tokenIdentifier: `${iss}|${sub}` };
}

// -- faults ----------------------------------------------------------------------------------
type Faults = {
  latency_ms: number; // added before every /api call runs
  error_rate: number; // fraction of /api calls answered with `status`
  fail_next: number; // the next N /api calls answered with `status` (deterministic)
  status: number;
  error_phase: "before" | "after"; // answer the error instead of running, or after running
  outage: boolean; // connections are reset, nothing runs
  no_answer: boolean; // the function runs, the answer never comes (the client times out)
};
const NO_FAULTS: Faults = {
  latency_ms: 0, error_rate: 0, fail_next: 0, status: 503, error_phase: "before", outage: false, no_answer: false,
};
let faults: Faults = { ...NO_FAULTS };
type Stats = { calls: Record<string, number>; faulted: number; reset_connections: number; unanswered: number };
const NO_STATS: Stats = { calls: {}, faulted: 0, reset_connections: 0, unanswered: 0 };
let stats: Stats = structuredClone(NO_STATS);

function setFaults(body: any): Faults {
  const next = { ...NO_FAULTS, ...body };
  const ok =
    Number.isFinite(next.latency_ms) && next.latency_ms >= 0 &&
    Number.isFinite(next.error_rate) && next.error_rate >= 0 && next.error_rate <= 1 &&
    Number.isSafeInteger(next.fail_next) && next.fail_next >= 0 &&
    Number.isSafeInteger(next.status) && next.status >= 400 && next.status <= 599 &&
    (next.error_phase === "before" || next.error_phase === "after") && typeof next.outage === "boolean" &&
    typeof next.no_answer === "boolean" &&
    Object.keys(next).every((k) => k in NO_FAULTS);
  if (!ok) throw new Error(`bad faults: ${JSON.stringify(body)}`);
  return next;
}

function faultNow(): boolean {
  if (faults.fail_next > 0) {
    faults.fail_next -= 1;
    return true;
  }
  return faults.error_rate > 0 && Math.random() < faults.error_rate;
}

// -- HTTP ------------------------------------------------------------------------------------
const KINDS = { "/api/query": "query", "/api/mutation": "mutation", "/api/action": "action" } as const;
type Kind = (typeof KINDS)[keyof typeof KINDS];
const KIND_NAME: Record<Kind, string> = { query: "Query", mutation: "Mutation", action: "Action" };

function send(res: ServerResponse, status: number, body: unknown) {
  const text = JSON.stringify(body);
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(text) });
  res.end(text);
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString("utf8");
}

const notFound = (path: string) =>
  `Could not find public function for '${path}'. Did you forget to run \`npx convex dev\` or \`npx convex deploy\`?`;

/** The module export a path names ("events:append", "dir/mod:fn", "mod" = default), if any. */
async function lookup(path: string): Promise<{ fn: any; canonical: string } | null> {
  const [modulePath, name = "default", ...rest] = path.split(":");
  if (rest.length > 0 || !modulePath) return null;
  const base = modulePath.replace(/\.js$/, "");
  const load = modules[`./${base}.ts`] ?? modules[`./${base}.js`];
  if (load === undefined || base.startsWith("_generated/")) return null;
  const fn = (await load())[name];
  return fn === undefined ? null : { fn, canonical: `${base}:${name}` };
}

async function callFunction(kind: Kind, body: any, authorization: string | undefined) {
  let caller = t;
  if (authorization !== undefined) {
    const bearer = /^Bearer (.+)$/.exec(authorization);
    if (bearer === null) {
      log("not implemented:", authorization.split(" ")[0], "authorization (deploy keys); refused");
      return [401, { code: "BadAdminKey", message: "The provided admin key was invalid for this instance" }] as const;
    }
    try {
      caller = t.withIdentity(await identityOf(bearer[1]));
    } catch (e) {
      if (e instanceof AuthError) return [401, { code: e.code, message: e.message }] as const;
      throw e;
    }
  }
  const found = await lookup(body.path);
  if (found === null || !found.fn.isPublic) {
    return [560, { status: "error", errorMessage: notFound(body.path) }] as const;
  }
  const actual: Kind = found.fn.isQuery ? "query" : found.fn.isMutation ? "mutation" : "action";
  if (actual !== kind) {
    return [560, {
      status: "error",
      errorMessage: `Trying to execute ${found.canonical} as ${KIND_NAME[kind]}, but it is defined as ${KIND_NAME[actual]}.`,
    }] as const;
  }
  let args: unknown;
  try {
    const raw = Array.isArray(body.args) ? body.args[0] ?? {} : body.args ?? {};
    args = jsonToConvex(raw);
    if (typeof args !== "object" || args === null || Array.isArray(args)) throw new Error("args must be an object");
  } catch (e) {
    return [400, { code: "BadConvexValue", message: `Invalid arguments: ${(e as Error).message}` }] as const;
  }
  stats.calls[found.canonical] = (stats.calls[found.canonical] ?? 0) + 1;
  try {
    const value = await caller[kind](makeFunctionReference(found.canonical), args);
    return [200, { status: "success", value: convexToJson(value === undefined ? null : value) }] as const;
  } catch (e) {
    const error = e as Error & { data?: unknown };
    if (error.data !== undefined) {
      return [560, { status: "error", errorMessage: error.message, errorData: convexToJson(error.data as any) }] as const;
    }
    // Argument validation reaches the caller as it is; any other plain Error is hidden in
    // production as "Server Error" (only a ConvexError carries data).
    if (/ArgumentValidationError|Validator error|Value does not match validator/.test(error.message)) {
      return [560, { status: "error", errorMessage: error.message }] as const;
    }
    log(`${found.canonical} threw:`, error.stack ?? error.message);
    return [560, { status: "error", errorMessage: "Server Error" }] as const;
  }
}

async function handleApi(req: IncomingMessage, res: ServerResponse, kind: Kind) {
  if (faults.outage) {
    stats.reset_connections += 1;
    req.socket.destroy();
    return;
  }
  const text = await readBody(req);
  let body: any;
  try {
    body = JSON.parse(text);
  } catch {
    return send(res, 400, { code: "BadJsonBody", message: "Failed to deserialize request body: not JSON" });
  }
  if (typeof body !== "object" || body === null || typeof body.path !== "string") {
    return send(res, 400, { code: "BadJsonBody", message: "Failed to deserialize request body: missing field `path`" });
  }
  if (body.format !== undefined && body.format !== "json" && body.format !== "convex_encoded_json") {
    log("not implemented: format", body.format);
    return send(res, 400, { code: "BadJsonBody", message: `Failed to deserialize request body: unknown format ${JSON.stringify(body.format)}` });
  }
  if (faults.latency_ms > 0) await new Promise((r) => setTimeout(r, faults.latency_ms));
  if (faults.error_phase === "before" && faultNow()) {
    stats.faulted += 1;
    return send(res, faults.status, { code: "InternalServerError", message: "stand-in fault (nothing ran)" });
  }
  const [status, answer] = await callFunction(kind, body, req.headers.authorization);
  if (faults.no_answer) {
    stats.unanswered += 1;
    return; // the connection stays open, silent, until the client gives up
  }
  if (faults.error_phase === "after" && faultNow()) {
    stats.faulted += 1;
    return send(res, faults.status, { code: "InternalServerError", message: "stand-in fault (the function ran)" });
  }
  send(res, status, answer);
}

const ADMIN_TOKEN = process.env.STANDIN_ADMIN_TOKEN;
if (!ADMIN_TOKEN) throw new Error("STANDIN_ADMIN_TOKEN is not set");

async function handleAdmin(req: IncomingMessage, res: ServerResponse, path: string) {
  if (req.headers["x-standin-admin"] !== ADMIN_TOKEN) return send(res, 403, { message: "admin token required" });
  if (path === "/_standin/faults" && req.method === "POST") {
    try {
      faults = setFaults(JSON.parse((await readBody(req)) || "{}"));
    } catch (e) {
      return send(res, 400, { message: (e as Error).message });
    }
    return send(res, 200, faults);
  }
  if (path === "/_standin/stats" && req.method === "GET") return send(res, 200, { ...stats, faults });
  if (path === "/_standin/reset" && req.method === "POST") {
    t = convexTest(schema, modules);
    faults = { ...NO_FAULTS };
    stats = structuredClone(NO_STATS);
    return send(res, 200, {});
  }
  return send(res, 404, { message: `no admin endpoint ${req.method} ${path}` });
}

const server = createServer((req, res) => {
  const path = new URL(req.url ?? "/", "http://standin").pathname;
  const done = (async () => {
    if (path.startsWith("/_standin/")) return handleAdmin(req, res, path);
    const kind = KINDS[path as keyof typeof KINDS];
    if (kind !== undefined && req.method === "POST") return handleApi(req, res, kind);
    log("not implemented:", req.method, path);
    return send(res, 404, { code: "NotFound", message: `the stand-in does not serve ${req.method} ${path}` });
  })();
  done.catch((e) => {
    log("internal error:", (e as Error).stack ?? e);
    if (!res.headersSent) send(res, 500, { code: "InternalServerError", message: "stand-in bug (see its log)" });
  });
});

server.listen(Number(process.env.STANDIN_PORT ?? 0), "127.0.0.1", () => {
  const address = server.address();
  console.log(`listening ${typeof address === "object" && address ? address.port : "?"}`);
});
for (const signal of ["SIGTERM", "SIGINT"] as const) process.on(signal, () => process.exit(0));

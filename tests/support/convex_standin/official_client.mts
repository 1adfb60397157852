// Convex's own HTTP client (ConvexHttpClient, from the pinned `convex` package) against the
// stand-in: if the reference client accepts the stand-in's answers, their shapes are Convex's.
// Run by tests/test_convex_standin.py with STANDIN_URL and STANDIN_TOKEN (a user JWT); prints one
// JSON line of what the client returned or raised.
import { join, dirname, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const CONVEX_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "../../../convex");
const { ConvexHttpClient } = await import(
  pathToFileURL(join(CONVEX_DIR, "node_modules/convex/dist/esm/browser/index.js")).href
);
const { makeFunctionReference } = await import(
  pathToFileURL(join(CONVEX_DIR, "node_modules/convex/dist/esm/server/index.js")).href
);

const client = new ConvexHttpClient(process.env.STANDIN_URL!);
client.setAuth(process.env.STANDIN_TOKEN!);
const ref = (path: string) => makeFunctionReference(path);
const outcome = async (call: Promise<unknown>) => {
  try {
    return { value: await call };
  } catch (e) {
    const error = e as Error & { data?: unknown };
    return { error: error.name, message: error.message, data: error.data ?? null };
  }
};

const session = { id: "ses-official", owner: "alice", repo: "/r", work_branch: "w", state: "idle", sandbox_state: "{}", created_at: 0 };
console.log(JSON.stringify({
  ping: await outcome(client.query(ref("health:ping"), {})),
  created: await outcome(client.mutation(ref("sessions:create"), { session })),
  appended: await outcome(client.mutation(ref("events:append"), {
    session_id: "ses-official", key: "k", events: [{ type: "t", data: "{}", ts: 1 }],
  })),
  refused: await outcome(client.mutation(ref("sessions:update"), { id: "nope", fields: {} })),
  missing: await outcome(client.query(ref("sessions:nope"), {})),
}));

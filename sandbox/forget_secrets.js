// tabbi's OpenCode plugin: OpenCode's secrets stay in OpenCode, out of every process it starts.
//
// OpenCode reads its server password and its config (which holds the model gateway token) from
// its environment when it starts, and every process it starts later inherits that environment:
// the agent's shell tools, and also the git and ripgrep processes OpenCode runs itself, whose
// /proc/<pid>/environ the agent can read while they run. With the password the agent could
// drive its own OpenCode API (answer its own permission requests, change its config).
// By the time plugins load, OpenCode has read both (its config and server auth are set up), so
// the plugin removes them from the environment its children will get. Loaded from a read-only
// folder (the sandbox package), never from a place the agent can write.
//
// OpenCode loads plugins (and reads its config) for each folder it opens; a sandbox's OpenCode
// opens one, the workspace: at its first request on a cold start, and while a warm sandbox still
// waits for its repository (bootstrap.py, open_warm_workspace), before anything of a person is
// in the sandbox. Either way the secrets are gone before the agent runs.
const SECRETS = ["OPENCODE_SERVER_PASSWORD", "OPENCODE_CONFIG_CONTENT"];

export const TabbiForgetSecrets = async () => {
  for (const name of SECRETS) delete process.env[name];
  return {};
};

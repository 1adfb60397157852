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
const SECRETS = ["OPENCODE_SERVER_PASSWORD", "OPENCODE_CONFIG_CONTENT"];

export const TabbiForgetSecrets = async () => {
  for (const name of SECRETS) delete process.env[name];
  return {};
};

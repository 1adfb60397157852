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
// One exception, for a warm sandbox (no repository, no person, no agent yet): OpenCode reads its
// config again for every folder it opens, so the bootstrap first opens an empty rehearsal folder
// (TABBI_REHEARSAL_DIR) to load everything OpenCode loads once per process, and the config must
// still be there when the workspace opens after the clone. The plugin loaded for exactly that
// folder keeps the secrets; loaded for any other folder (the workspace) it removes them, and the
// rehearsal's name with them, so no folder opened later is exempt.
const SECRETS = ["OPENCODE_SERVER_PASSWORD", "OPENCODE_CONFIG_CONTENT"];
const REHEARSAL = "TABBI_REHEARSAL_DIR";

export const TabbiForgetSecrets = async ({ directory }) => {
  const rehearsal = process.env[REHEARSAL];
  if (rehearsal && directory === rehearsal) return {};
  for (const name of [...SECRETS, REHEARSAL]) delete process.env[name];
  return {};
};

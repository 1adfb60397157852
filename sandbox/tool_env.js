// tabbi's OpenCode plugin: the agent's tools run without OpenCode's secrets.
//
// OpenCode gives its shell tools its own environment, which holds its server password (with
// it, the agent could drive its own OpenCode API: answer its own permission requests, change
// its config) and its config (the model gateway token). The `shell.env` hook's output is
// merged over that environment just before the tool's shell is spawned; an undefined value
// leaves the variable out. Loaded from a read-only folder (the sandbox package), never from
// a place the agent can write.
const SECRETS = ["OPENCODE_SERVER_PASSWORD", "OPENCODE_CONFIG_CONTENT"];

export const TabbiToolEnv = async () => ({
  "shell.env": async (_input, output) => {
    for (const name of SECRETS) output.env[name] = undefined;
  },
});

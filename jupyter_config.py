"""Run Jupyter with tabbi on the embedded defaults: local sandboxes, SQLite, data in TABBI_DATA_DIR
(default: <jupyter data dir>/tabbi). Used by `make lab`; pass it to any Jupyter command with
`--config=jupyter_config.py`.

The model comes from the environment: TABBI_MODEL=provider/model with the provider's key
(OPENAI_API_KEY, ANTHROPIC_API_KEY), or TABBI_LLM_BASE_URL (+ TABBI_LLM_API_KEY) and TABBI_MODEL
for any OpenAI-compatible server.
"""

c = get_config()  # noqa: F821 - provided by Jupyter when it loads this file

c.ServerApp.jpserver_extensions = {"tabbi_extension": True}
# Sandboxes run under bubblewrap where it works and as plain subprocesses elsewhere (logged once).
c.TabbiExtension.isolation = "auto"

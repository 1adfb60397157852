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
# A personal server: sessions may start from local repositories in your home, this folder and the
# temp folder (the quickstart makes its sample repository there). Never tabbi's own data dir. A
# server shared by several people should leave this unset: then only the Jupyter root dir counts.
import os  # noqa: E402
import tempfile  # noqa: E402

c.TabbiExtension.local_repo_roots = [os.getcwd(), os.path.expanduser("~"), tempfile.gettempdir()]

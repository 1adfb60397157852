"""Run Jupyter with tabbi on the embedded defaults: local sandboxes, SQLite, data in TABBI_DATA_DIR
(default: <jupyter data dir>/tabbi). Used by `make lab` (`jupyter lab --config=jupyter_config.py`).

Jupyter serves `lab/` beside this file, a git-ignored folder: the notebooks you make there never
become files of the project. The quickstart is copied in when missing, so running it (Jupyter
saves its outputs) leaves the project's own copy in `notebooks/` untouched.

The model comes from the environment: TABBI_MODEL=provider/model with the provider's key
(OPENAI_API_KEY, ANTHROPIC_API_KEY), TABBI_LLM_BASE_URL (+ TABBI_LLM_API_KEY) and TABBI_MODEL for
any OpenAI-compatible server, or TABBI_MODEL=demo for tabbi's demo model (canned answers, no key).
"""

import os
import shutil
import tempfile
from pathlib import Path

c = get_config()  # noqa: F821 - provided by Jupyter when it loads this file

HERE = Path(__file__).resolve().parent
LAB = HERE / "lab"
LAB.mkdir(exist_ok=True)
if not (LAB / "quickstart.ipynb").exists():
    shutil.copyfile(HERE / "notebooks" / "quickstart.ipynb", LAB / "quickstart.ipynb")

c.ServerApp.root_dir = str(LAB)
# Jupyter refuses to run as root unless told; machines of this kind (containers, CI) run as root.
c.ServerApp.allow_root = os.geteuid() == 0
c.ServerApp.jpserver_extensions = {"tabbi_extension": True}
# Sandboxes run under bubblewrap where it works and as plain subprocesses elsewhere (logged once).
c.TabbiExtension.isolation = "auto"
# A personal server: sessions may start from local repositories in your home, this folder and the
# temp folder (the quickstart makes its sample repository there). Never tabbi's own data dir. A
# server shared by several people should leave this unset: then only the Jupyter root dir counts.
c.TabbiExtension.local_repo_roots = [str(HERE), os.path.expanduser("~"), tempfile.gettempdir()]

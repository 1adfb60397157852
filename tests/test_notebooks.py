"""The example notebooks run under nbval against a real server with tabbi (the quickstart uses the
demo model, as a person without an API key would): every cell runs, and outputs are compared
(session ids, branches and temporary paths sanitized)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.notebooks import NOTEBOOKS, server_env
from tests.support.server import JupyterProcess

pytestmark = pytest.mark.timeout(400)


def test_quickstart_notebook_under_nbval(tmp_path, llm):
    server = JupyterProcess(llm.url, tmp_path / "server")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
             "--nbval-sanitize-with", str(NOTEBOOKS / "sanitize.cfg"), "--nbval-cell-timeout=300",
             str(NOTEBOOKS / "quickstart.ipynb")],
            env={**os.environ, **server_env(server)}, capture_output=True, text=True, timeout=380,
            cwd=tmp_path,
        )
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout

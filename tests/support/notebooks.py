"""The example notebooks against a real server, and how to refresh the outputs stored in them
(``python -m tests.support.notebooks``). The quickstart asks for tabbi's demo model itself
(``--model demo``), so it runs the same here as for a person without an API key."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from tests.support.llm import ScriptedLLM

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"

def server_env(server) -> dict[str, str]:
    """How a kernel not started by that server finds it (the explicit route of discovery)."""
    return {"TABBI_SERVER_URL": server.url, "TABBI_SERVER_TOKEN": server.token}


def coalesce_streams(outputs: list) -> list:
    """Streamed text arrives in chunks whose boundaries vary; store it as one output per stream."""
    merged: list = []
    for output in outputs:
        last = merged[-1] if merged else None
        if (output.get("output_type") == "stream" and last is not None
                and last.get("output_type") == "stream" and last.get("name") == output.get("name")):
            last["text"] += output["text"]
        else:
            merged.append(output)
    return merged


def regenerate(name: str = "quickstart.ipynb") -> None:
    """Re-run a notebook against a fresh server and the scripted model and store its outputs."""
    import nbformat
    from nbclient import NotebookClient

    from tests.support.server import JupyterProcess

    llm = ScriptedLLM().start()
    server = JupyterProcess(llm.url, Path(tempfile.mkdtemp(prefix="tabbi-nb-")))
    try:
        path = NOTEBOOKS / name
        notebook = nbformat.read(path, as_version=4)
        os.environ.update(server_env(server))
        NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs = coalesce_streams(cell.outputs)
        nbformat.write(notebook, path)
    finally:
        server.stop()
        llm.stop()


if __name__ == "__main__":
    regenerate(*sys.argv[1:])

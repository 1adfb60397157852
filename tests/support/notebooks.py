"""The example notebooks against the scripted model: what the model answers, and how to refresh
the outputs stored in the notebooks (``python -m tests.support.notebooks``)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from tests.support.llm import Reply, ScriptedLLM, write

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"

SLUGIFY = 'def slugify(text):\n    return "-".join(text.lower().split())\n'


def script_quickstart(llm: ScriptedLLM) -> None:
    llm.enqueue(
        Reply(text="I'll add slugify to text_utils.py.", tools=[write("text_utils.py", SLUGIFY)]),
        Reply(text="Added `slugify(text)` in text_utils.py: it lowercases the text and joins "
                   "its words with dashes.", chunks=6),
    )


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
        script_quickstart(llm)
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

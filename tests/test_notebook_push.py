"""Notebooks in the repository, end to end: a real server, real OpenCode (scripted model) editing
``.ipynb`` files, a real kernel, and real git (the session's repository is a local one, so the
push lands in it and the test reads the pushed commit there).

One session per test: the journey (cell diff, stripped push, --keep-outputs, cells pushed as a
notebook, an invalid notebook refused) and the hostile workspace.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import nbformat
import pytest

from tests.conftest import git
from tests.support.llm import Reply, bash, write
from tests.test_kernel import start

pytestmark = pytest.mark.timeout(400)

STREAM = {"output_type": "stream", "name": "stdout", "text": "rows: 42\n"}


def code(source: str, cell_id: str, outputs: list | None = None, count: int | None = None,
         **metadata) -> dict:
    return {"cell_type": "code", "id": cell_id, "metadata": metadata, "source": source,
            "outputs": outputs or [], "execution_count": count}


def notebook(*cells: dict) -> str:
    metadata = {"kernelspec": {"name": "python3", "display_name": "P"}}
    return json.dumps({"cells": list(cells), "metadata": metadata, "nbformat": 4, "nbformat_minor": 5},
                      indent=1) + "\n"


def pushed(repo, branch: str, path: str) -> str:
    return git("show", f"{branch}:{path}", cwd=repo)


def branch_head(repo, branch: str) -> str | None:
    done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", branch], cwd=repo,
                          capture_output=True, text=True)
    return done.stdout.strip() or None


async def turn(kernel, llm, *tools) -> None:
    llm.enqueue(Reply(tools=list(tools)), Reply(text="done"))
    done = await kernel.run("%%tabbi\nwork on the notebooks")
    assert done.status == "ok" and "completed" in done.stdout, done


async def test_a_notebook_the_agent_edits_is_diffed_by_cell_and_pushed_without_outputs(
        kernel, llm, source_repo, api, tmp_path):
    (source_repo / "analysis.ipynb").write_text(notebook(
        {"cell_type": "markdown", "id": "m1", "metadata": {}, "source": "# Sales"},
        code("df = load()\nprint(len(df))", "c1", [STREAM], 1)))
    git("add", ".", cwd=source_repo)
    git("commit", "-qm", "a notebook", cwd=source_repo)
    sid = await start(kernel, source_repo)
    await turn(kernel, llm, write("analysis.ipynb", notebook(
        {"cell_type": "markdown", "id": "m1", "metadata": {}, "source": "# Sales"},
        code("df = load('sales.csv')\nprint(len(df))", "c1", [{**STREAM, "text": "rows: 43\n"}], 2),
        code("df.describe()", "c2", [{"output_type": "execute_result", "execution_count": 3, "metadata": {},
                                      "data": {"text/plain": "summary-table"}}], 3,
             ExecuteTime={"start_time": "2026-01-01"}))))

    # The diff: each notebook by cell, sources by default, outputs on request.
    data = await api.ok("GET", f"tabbi/api/sessions/{sid}/diff")
    entry = next(f for f in data["files"] if f["path"] == "analysis.ipynb")
    cells = entry["notebook"]["cells"]
    assert [(c["index"], c["change"], c["cell_type"], c["outputs_changed"]) for c in cells] == [
        (1, "modified", "code", True), (2, "added", "code", True)]
    assert "-df = load()" in cells[0]["source"] and "+df = load('sales.csv')" in cells[0]["source"]
    assert cells[1]["source"] == "@@ -0,0 +1 @@\n+df.describe()"
    assert (entry["additions"], entry["deletions"]) == (2, 1)  # the cells' source lines, not JSON's
    text = entry["notebook"]["text"]
    assert "df.describe()" in text and "load('sales.csv')" in text
    assert '"cell_type":' not in text and "\x1b" not in text and "summary-table" not in text
    assert '"cell_type"' in data["diff"]  # the JSON patch is still there, for clients that want it
    with_outputs = await api.ok("GET", f"tabbi/api/sessions/{sid}/diff", params={"outputs": "1"})
    shown = next(f for f in with_outputs["files"] if f["path"] == "analysis.ipynb")["notebook"]["text"]
    assert "summary-table" in shown and "rows: 43" in shown
    assert (await api.call("GET", f"tabbi/api/sessions/{sid}/diff", params={"outputs": "yes"}))[0] == 400
    magic = await kernel.run("%tabbi diff --outputs")
    assert magic.status == "ok" and "analysis.ipynb" in magic.displays[0]["text/plain"], magic

    # Pushed without outputs, execution counts or timings; the sources as the agent wrote them.
    done = await kernel.run("%tabbi push -m 'notebook, stripped'")
    assert done.status == "ok", done
    assert "cells written to" not in done.displays[0]["text/plain"]  # stripping is not a push of cells
    branch = f"tabbi/{sid.removeprefix('ses-')}"
    committed = nbformat.reads(pushed(source_repo, branch, "analysis.ipynb"), as_version=4)
    nbformat.validate(committed)
    assert [c.source for c in committed.cells] == ["# Sales", "df = load('sales.csv')\nprint(len(df))",
                                                   "df.describe()"]
    assert all(c.outputs == [] and c.execution_count is None
               for c in committed.cells if c.cell_type == "code")
    assert "ExecuteTime" not in committed.cells[2].metadata

    # --keep-outputs keeps them.
    await turn(kernel, llm, write("kept.ipynb", notebook(code("print(42)", "k1", [STREAM], 5))))
    done = await kernel.run("%tabbi push -m 'with outputs' --keep-outputs")
    assert done.status == "ok", done
    kept = nbformat.reads(pushed(source_repo, branch, "kept.ipynb"), as_version=4)
    assert kept.cells[0].outputs[0]["text"] == "rows: 42\n" and kept.cells[0].execution_count == 5

    # Cells of the person's notebook, read by the real kernel, pushed as a notebook.
    mine = tmp_path / "mine.ipynb"
    mine.write_text(notebook(
        code("secret = 1", "p0"), code("result = 2\nresult", "p1", [STREAM], 9, tags=["share"]),
        {"cell_type": "markdown", "id": "p2", "metadata": {"tags": ["share"]}, "source": "Notes"}))
    for flag, outputs in (("", []), (" --keep-outputs", [STREAM])):
        target = f"notebooks/shared{flag.strip('- ')}.ipynb"
        done = await kernel.run(
            f"%tabbi push --cells share --to {target} --cells-only --notebook {mine}{flag}")
        assert done.status == "ok", done
        made = nbformat.reads(pushed(source_repo, branch, target), as_version=4)
        nbformat.validate(made)
        assert [c.source for c in made.cells] == ["result = 2\nresult", "Notes"]
        assert made.cells[0].outputs == outputs

    # A notebook nbformat refuses is not pushed, and nothing else is either.
    before = branch_head(source_repo, branch)
    broken = json.loads(notebook(code("x = 1", "b1")))
    del broken["cells"][0]["outputs"]
    await turn(kernel, llm, write("nb/broken.ipynb", json.dumps(broken)), write("other.py", "x = 1\n"))
    refused = await kernel.run("%tabbi push -m 'broken'")
    assert refused.status == "error", refused
    assert "nb/broken.ipynb is not a valid notebook" in refused.stderr
    assert "'outputs' is a required property" in refused.stderr and "Nothing was pushed" in refused.stderr
    assert branch_head(source_repo, branch) == before
    assert "other.py" not in git("ls-tree", "-r", "--name-only", branch, cwd=source_repo)


HOSTILE = r"""
{ printf '{"cells": [], "pad": "'; head -c 12000000 /dev/zero | tr '\0' a; printf '"}'; } > huge.ipynb
{ printf '{"cells": ['; head -c 200000 /dev/zero | tr '\0' '['
  head -c 200000 /dev/zero | tr '\0' ']'; printf ']}'; } > deep.ipynb
printf '{"cells": [ not json' > bad.ipynb
mkfifo .stall
ln -s .stall stall.ipynb
printf '{"cells": [], "metadata": {"secret": "HOMESECRET"}, "nbformat": 4}' > "$HOME/s.ipynb"
ln -s "$HOME/s.ipynb" link.ipynb
printf '*.ipynb filter=evil\n' > .gitattributes
git config filter.evil.clean "sh -c 'touch MARKER; cat; echo FILTERED'"
"""


async def test_hostile_notebooks_fall_back_to_json_and_nothing_of_the_agent_runs(
        kernel, llm, source_repo, api, tmp_path):
    """Threat: the agent writes notebooks made to crash, stall or fill the server that reads them
    (12 MB, 200,000 levels deep, not JSON, a FIFO that would block a reader, a link to a file
    outside the repository that it would have read and shown) and a ``.gitattributes`` whose
    filter would run a command (here: touch a file of the host's, and append to what it cleans)
    wherever git adds a notebook. The diff shows them as JSON with a note while the server keeps
    answering others; a push refuses them; once they are gone, the pushed notebook is tabbi's
    stripped one, not the filter's, and the filter never ran outside the sandbox."""
    sid = await start(kernel, source_repo)
    marker = tmp_path / "host-marker"
    await turn(kernel, llm, bash(HOSTILE.replace("MARKER", str(marker))))

    pending = asyncio.ensure_future(api.ok("GET", f"tabbi/api/sessions/{sid}/diff"))
    answered = await api.ok("GET", "tabbi/api/sessions")
    assert not pending.done()  # answered while the diff of those notebooks was still under way
    assert [s["id"] for s in answered["sessions"]] == [sid]
    data = await pending
    files = {f["path"]: f for f in data["files"]}
    assert "over 10000000" in files["huge.ipynb"]["notebook_note"]
    assert "nested deeper" in files["deep.ipynb"]["notebook_note"]
    assert "not valid JSON" in files["bad.ipynb"]["notebook_note"]
    assert not any("notebook" in files[p] for p in ("huge.ipynb", "deep.ipynb", "bad.ipynb"))
    assert "points outside the repository" in files["link.ipynb"]["notebook_note"]
    assert "notebook" not in files["link.ipynb"] and "HOMESECRET" not in json.dumps(data)
    assert "not a regular file" in files["stall.ipynb"]["notebook_note"]  # a link to a FIFO

    refused = await kernel.run("%tabbi push -m hostile")
    assert refused.status == "error" and "Nothing was pushed" in refused.stderr, refused
    assert "is not a valid notebook" in refused.stderr or "cannot be checked" in refused.stderr
    branch = f"tabbi/{sid.removeprefix('ses-')}"
    assert branch_head(source_repo, branch) is None

    await turn(kernel, llm, bash("rm huge.ipynb deep.ipynb bad.ipynb .stall stall.ipynb link.ipynb"),
               write("good.ipynb", notebook(code("print('hi')", "g1", [STREAM], 1))))
    done = await kernel.run("%tabbi push -m good")
    assert done.status == "ok", done
    blob = pushed(source_repo, branch, "good.ipynb")
    assert "FILTERED" not in blob and nbformat.reads(blob, as_version=4).cells[0].outputs == []
    assert not marker.exists()

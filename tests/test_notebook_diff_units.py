"""Cell-level diffs, stripping and validation of notebooks, without a server: the worker process
(``notebook_files``) on well-formed and hostile notebooks, ``notebook_diff`` and ``notebook_strip``.
The journeys through a real server and OpenCode are in ``test_notebook_push.py``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nbformat
import pytest

from tabbi_extension import cells, notebook_diff, notebook_files, notebook_strip
from tabbi_extension.validation import ValidationError

STREAM = {"output_type": "stream", "name": "stdout", "text": "rows: 43\n"}


def code(source: str, cell_id: str, outputs: list | None = None, count: int | None = None,
         **metadata) -> dict:
    return {"cell_type": "code", "id": cell_id, "metadata": metadata, "source": source,
            "outputs": outputs or [], "execution_count": count}


def markdown(source: str, cell_id: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": source}


def notebook(*cells_: dict, **metadata) -> dict:
    return {"cells": list(cells_), "metadata": metadata, "nbformat": 4, "nbformat_minor": 5}


OLD = notebook(markdown("# Sales", "m1"), code("df = load()\nprint(len(df))", "c1", [STREAM], 1),
               code("old_plot()", "c2"), code("tail()", "c3"))
NEW = notebook(markdown("# Sales", "m1"), code("df = load('sales.csv')\nprint(len(df))", "c1", [STREAM], 2),
               code("df.describe()", "c4", [{**STREAM, "text": "summary-table\n"}], 3), code("tail()", "c3"))


def test_cells_are_listed_with_their_source_diff_and_the_text_has_no_json_or_colour():
    result = notebook_diff.cell_diff(OLD, NEW, "sales.ipynb", outputs=False)
    changes = [(c["index"], c["change"], c["cell_type"], c["outputs_changed"]) for c in result["cells"]]
    assert changes == [(1, "modified", "code", False), (2, "added", "code", True),
                       (2, "removed", "code", False)] or sorted(changes) == sorted(
        [(1, "modified", "code", False), (2, "added", "code", True), (2, "removed", "code", False)])
    modified = result["cells"][0]
    assert "-df = load()" in modified["source"] and "+df = load('sales.csv')" in modified["source"]
    assert (result["additions"], result["deletions"]) == (2, 2)  # 1+1 modified, 1 added, 1 removed
    text = result["text"]
    assert text.startswith("--- a/sales.ipynb\n+++ b/sales.ipynb\n")
    assert "df.describe()" in text and "load('sales.csv')" in text
    assert '"cell_type":' not in text and "\x1b" not in text
    assert "summary-table" not in text  # outputs only on request
    shown = notebook_diff.cell_diff(OLD, NEW, "sales.ipynb", outputs=True)["text"]
    assert "summary-table" in shown


def test_an_added_notebook_shows_its_cells_and_outputs_only_changes_are_listed():
    added = notebook_diff.cell_diff(None, NEW, "new.ipynb", outputs=False)
    assert [c["change"] for c in added["cells"]] == ["added"] * 4
    assert "# Sales" in added["text"] and "kernelspec" not in added["text"]
    rerun = json.loads(json.dumps(OLD))
    rerun["cells"][1]["outputs"] = [{**STREAM, "text": "rows: 44\n"}]
    only_outputs = notebook_diff.cell_diff(OLD, rerun, "a.ipynb", outputs=False)
    assert [(c["change"], c["outputs_changed"], c["source"]) for c in only_outputs["cells"]] == [
        ("modified", True, "")]
    assert (only_outputs["additions"], only_outputs["deletions"]) == (0, 0)


#: One loop for the module's requests, so they share one worker (it starts once per loop).
LOOP = asyncio.new_event_loop()


@pytest.fixture(scope="module", autouse=True)
def _one_worker():
    yield
    worker = notebook_files._workers.get(LOOP)
    if worker is not None:
        LOOP.run_until_complete(worker.end())
    LOOP.close()


def run_worker(task: str, options: dict, entries: list[dict]) -> dict:
    payload = json.dumps({"notebooks": entries}).encode()
    return LOOP.run_until_complete(notebook_files.work(task, options, payload))


def test_the_worker_turns_hostile_notebooks_into_reasons():
    """Threat: the agent writes notebooks made to crash or stall whoever parses them: nesting
    100,000 levels deep, JSON that is not JSON, a notebook of the wrong shape, and (in the same
    request) a good one. Each bad one comes back as a reason; the good one is still diffed."""
    deep = '{"cells": [' + "[" * 100_000 + "]" * 100_000 + "]}"
    shallow_but_deep = '{"cells": [], "metadata": ' + '{"a": ' * 200 + "1" + "}" * 200 + "}"
    entries = [
        {"path": "deep.ipynb", "new": deep},
        {"path": "deep2.ipynb", "new": shallow_but_deep},
        {"path": "bad.ipynb", "new": '{"cells": [ not json'},
        {"path": "list.ipynb", "new": "[1, 2]"},
        {"path": "huge.ipynb", "skipped": "new content: 12000000 bytes, over 10000000"},
        {"path": "good.ipynb", "old": json.dumps(OLD), "new": json.dumps(NEW)},
    ]
    results = run_worker("diff", {"outputs": False}, entries)
    assert "nested deeper" in results["deep.ipynb"]["error"]
    assert "nested deeper" in results["deep2.ipynb"]["error"]
    assert "not valid JSON" in results["bad.ipynb"]["error"]
    assert "not a notebook" in results["list.ipynb"]["error"]
    assert "over 10000000" in results["huge.ipynb"]["error"]
    assert [c["change"] for c in results["good.ipynb"]["cells"]] == ["modified", "added", "removed"]


def test_a_worker_past_its_memory_limit_fails_as_an_error_and_the_next_request_gets_a_new_one(
        monkeypatch, tmp_path):
    """Threat: a notebook that takes the worker's memory (here 80 MB of source in one cell, fed
    to the worker directly). The worker's address space is capped (a copy of it with a 150 MB cap
    runs here, to be quick): it dies, that request fails with an error the server turns into a
    fallback, and the next request is served by a fresh worker."""
    for name in ("notebook_files.py", "notebook_diff.py", "notebook_strip.py"):
        text = (Path(notebook_files.__file__).parent / name).read_text()
        (tmp_path / name).write_text(text.replace("WORKER_MEMORY_BYTES = 2_000_000_000",
                                                  "WORKER_MEMORY_BYTES = 150_000_000"))
    monkeypatch.setattr(notebook_files, "__file__", str(tmp_path / "notebook_files.py"))
    small = {"path": "s.ipynb", "new": json.dumps(NEW)}
    big = {"path": "b.ipynb", "new": json.dumps(notebook(code("x" * 80_000_000, "c1")))}

    async def requests() -> tuple:
        first = await notebook_files.work("diff", {}, json.dumps({"notebooks": [small]}).encode())
        with pytest.raises(notebook_files.NotebookError, match="worker stopped"):
            await notebook_files.work("diff", {}, json.dumps({"notebooks": [big]}).encode())
        again = await notebook_files.work("diff", {}, json.dumps({"notebooks": [small]}).encode())
        await notebook_files._workers[asyncio.get_running_loop()].end()
        return first, again

    first, again = asyncio.run(requests())
    assert first == again and len(first["s.ipynb"]["cells"]) == 4


def test_a_request_cancelled_mid_exchange_never_hands_its_answer_to_the_next():
    """The worker is shared by every session of the server. A request cancelled after it was
    sent (its client went away) would leave its answer in the pipe, and the next request (another
    person's) would read it as its own: for a push, that person's notebook in another repository."""
    mine = {"path": "mine.ipynb", "new": json.dumps(NEW)}
    theirs = {"path": "theirs.ipynb", "old": json.dumps(OLD), "new": json.dumps(NEW)}

    async def requests() -> dict:
        await notebook_files.work("diff", {}, json.dumps({"notebooks": [mine]}).encode())  # a worker
        worker = notebook_files._workers[asyncio.get_running_loop()]
        sent, drain = asyncio.Event(), worker.proc.stdin.drain

        async def drained() -> None:
            await drain()
            sent.set()

        worker.proc.stdin.drain = drained
        cancelled = asyncio.ensure_future(
            notebook_files.work("diff", {}, json.dumps({"notebooks": [theirs]}).encode()))
        await sent.wait()
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        answer = await notebook_files.work("diff", {}, json.dumps({"notebooks": [mine]}).encode())
        await notebook_files._workers[asyncio.get_running_loop()].end()
        return answer

    assert list(asyncio.run(requests())) == ["mine.ipynb"]


def test_strip_validate_and_refuse():
    dirty = notebook(code("print(1)", "c1", [STREAM], 7, ExecuteTime={"start": "x"}, tags=["keep"]),
                     markdown("text", "m1"), signature="abc", widgets={"state": {}})
    clean = notebook_strip.strip(dirty)
    assert clean["cells"][0]["outputs"] == [] and clean["cells"][0]["execution_count"] is None
    assert clean["cells"][0]["metadata"] == {"tags": ["keep"]}
    assert "signature" not in clean["metadata"] and "widgets" not in clean["metadata"]
    assert dirty["cells"][0]["outputs"] == [STREAM]  # a copy
    nbformat.validate(nbformat.from_dict(clean))

    results = run_worker("strip", {"keep_outputs": False}, [
        {"path": "a.ipynb", "status": "modified", "new": json.dumps(dirty)},
        {"path": "same.ipynb", "status": "added", "new": json.dumps(clean)},
        {"path": "gone.ipynb", "status": "deleted"},
    ])
    assert set(results["files"]) == {"a.ipynb"}  # unchanged by stripping: left as written
    assert nbformat.reads(results["files"]["a.ipynb"], as_version=4) == nbformat.from_dict(clean)
    kept = run_worker("strip", {"keep_outputs": True}, [{"path": "a.ipynb", "new": json.dumps(dirty)}])
    assert kept == {"files": {}}

    broken = notebook(code("x", "c1"))
    del broken["cells"][0]["outputs"]
    refused = run_worker("strip", {"keep_outputs": False}, [
        {"path": "ok.ipynb", "new": json.dumps(clean)},
        {"path": "nb/broken.ipynb", "new": json.dumps(broken)}])
    assert refused["error"].startswith("nb/broken.ipynb is not a valid notebook: ")
    assert "'outputs' is a required property" in refused["error"]
    assert "not valid JSON" in run_worker("strip", {}, [{"path": "j.ipynb", "new": "{"}])["error"]


def test_cells_pushed_to_an_ipynb_make_a_valid_notebook():
    name, parsed = cells.from_request({"notebook": "work.ipynb", "select": "share", "cells": [
        {"cell_type": "markdown", "source": "# Title", "tags": ["share"], "id": "m1"},
        {"cell_type": "code", "source": ["x = 1\n", "print(x)"], "tags": ["share"], "id": "c1",
         "outputs": [STREAM], "execution_count": 4},
        {"cell_type": "code", "source": "secret()", "id": "c2"},
    ]})
    path, content = cells.file_for(parsed, name, "share", "out/shared.ipynb")
    made = nbformat.reads(content, as_version=4)
    nbformat.validate(made)
    assert path == "out/shared.ipynb" and [c.source for c in made.cells] == ["# Title", "x = 1\nprint(x)"]
    assert made.cells[1].outputs == [] and made.cells[1].execution_count is None
    _, kept = cells.file_for(parsed, name, "share", "out/shared.ipynb", keep_outputs=True)
    assert nbformat.reads(kept, as_version=4).cells[1].outputs[0]["text"] == "rows: 43\n"
    with pytest.raises(ValidationError, match="valid notebook"):
        bad = {"cells": [{**parsed["cells"][1], "outputs": [{"output_type": "nonsense"}]}]}
        cells.file_for(bad, name, "share", "x.ipynb", keep_outputs=True)
    with pytest.raises(ValidationError, match="outputs"):
        cells.from_request({"notebook": "w.ipynb", "cells": [
            {"cell_type": "code", "source": "", "outputs": "not a list"}]})

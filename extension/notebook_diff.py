"""Cell-level diffs of notebooks, by nbdime: what a person reviews when the agent changed an
``.ipynb``, in place of git's patch of its JSON.

Two parts. ``cell_diff`` (run in the notebook worker, ``notebook_files``, never in the server)
turns two parsed notebooks into ``{text, cells, additions, deletions}``: ``text`` is nbdime's
pretty-printed diff, plain (no colour, no external ``git diff``: nbdime's difflib renderer), and
``cells`` lists each added, removed or modified cell with a unified diff of its source.
Outputs are compared always (``outputs_changed``) but shown only on request. ``annotate`` (run
in the server) adds that to each notebook of a workspace diff, or a note saying why a notebook
is shown as JSON.
"""

from __future__ import annotations

import difflib
import io
import types
from typing import Any

#: What one notebook's cell-level diff may hold: its text, and its cells' source diffs in all.
MAX_TEXT_CHARS = 200_000
MAX_CELLS_CHARS = 200_000

_EMPTY = {"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def cell_diff(old: dict[str, Any] | None, new: dict[str, Any] | None, path: str,
              outputs: bool) -> dict[str, Any]:
    """The cell-level diff of ``old`` -> ``new`` (``None``: the notebook is added or deleted)."""
    import nbdime.diffing.notebooks as differ
    from nbdime.prettyprint import PrettyPrintConfig, pretty_print_diff

    a, b = _normal(old, new), _normal(new, old)
    differ.set_notebook_diff_targets(identifier=False)
    full = differ.diff_notebooks(a, b)
    cells, additions, deletions = _cells(a, b, full)
    if not outputs:
        differ.set_notebook_diff_targets(outputs=False, attachments=False, identifier=False, details=False)
    shown = full if outputs else differ.diff_notebooks(a, b)
    differ.reset_notebook_differ()
    out = io.StringIO()
    include = types.SimpleNamespace(sources=True, outputs=outputs, attachments=outputs, metadata=True,
                                    id=False, details=outputs)
    config = PrettyPrintConfig(out=out, include=include, use_git=False, use_diff=False, use_color=False)
    if shown:
        pretty_print_diff(a, shown, "", config)
    body = out.getvalue()
    if len(body) > MAX_TEXT_CHARS:
        body = body[:MAX_TEXT_CHARS] + f"\n# tabbi: the cell diff of {path} is cut here\n"
    if not body.strip():
        body = "(no change in the cells' sources" + ("" if outputs else "; outputs not shown") + ")\n"
    text = f"--- a/{path}\n+++ b/{path}\n{body}"
    return {"text": text, "cells": cells, "additions": additions, "deletions": deletions}


def _normal(notebook: dict[str, Any] | None, other: dict[str, Any] | None) -> dict[str, Any]:
    """A notebook as nbdime expects it (sources and output texts as strings); a missing one is
    the other without cells, so adding a notebook shows its cells, not its metadata."""
    import nbformat
    from nbformat.v4.rwbase import rejoin_lines

    if notebook is None:
        return {**_EMPTY, **{k: v for k, v in (other or {}).items() if k != "cells"}, "cells": []}
    return rejoin_lines(nbformat.from_dict(notebook))


def _source(cell: dict[str, Any] | None) -> str:
    source = (cell or {}).get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _cells(a: dict[str, Any], b: dict[str, Any], diff: list[Any]) -> tuple[list[dict[str, Any]], int, int]:
    """Each changed cell: its index (in the new notebook; in the old one if removed), the change,
    its type, a unified diff of its source and whether its outputs changed; and the source lines
    added and removed in all."""
    ops = next((entry.diff for entry in diff if entry.key == "cells" and entry.op == "patch"), [])
    removed: list[tuple[int, int]] = []
    added = 0
    cells: list[dict[str, Any]] = []
    additions = deletions = used = 0

    def new_index(key: int) -> int:
        return key - sum(min(n, max(0, key - start)) for start, n in removed) + added

    def record(index: int, change: str, old: dict | None, new: dict | None) -> None:
        nonlocal additions, deletions, used
        lines = list(difflib.unified_diff(_source(old).splitlines(), _source(new).splitlines(),
                                          "a", "b", lineterm="", n=3))[2:]
        additions += sum(line.startswith("+") for line in lines)
        deletions += sum(line.startswith("-") for line in lines)
        source = "\n".join(lines)
        if used + len(source) > MAX_CELLS_CHARS:
            source = "# tabbi: not shown (the notebook's cell diffs are too long)"
        used += len(source)
        if change == "modified":
            outputs_changed = (old or {}).get("outputs") != (new or {}).get("outputs")
        else:
            outputs_changed = bool((old or new or {}).get("outputs"))
        cells.append({"index": index, "change": change, "cell_type": (new or old or {}).get("cell_type"),
                      "source": source, "outputs_changed": outputs_changed})

    for op in ops:
        if op.op == "addrange":
            at = new_index(op.key)
            for offset, cell in enumerate(op.valuelist):
                record(at + offset, "added", None, cell)
            added += len(op.valuelist)
        elif op.op == "removerange":
            for offset in range(op.length):
                record(op.key + offset, "removed", a["cells"][op.key + offset], None)
            removed.append((op.key, op.length))
        elif op.op == "patch":
            index = new_index(op.key)
            record(index, "modified", a["cells"][op.key], b["cells"][index])
    return cells, additions, deletions


def diff_all(listing: dict[str, Any], options: dict[str, Any], parse: Any) -> dict[str, Any]:
    """The worker's ``diff`` task: ``{path: cell diff | {"error": why}}`` for every notebook the
    sandbox program read."""
    results: dict[str, Any] = {}
    for entry in listing.get("notebooks", []):
        path = entry.get("path", "")
        if entry.get("skipped"):
            results[path] = {"error": entry["skipped"]}
            continue
        sides = []
        for side in ("old", "new"):
            if entry.get(side) is None:
                sides.append(None)
                continue
            notebook, why = parse(entry[side])
            if why:
                results[path] = {"error": f"the {side} notebook is {why}"}
                break
            sides.append(notebook)
        else:
            if sides == [None, None]:
                results[path] = {"error": "no notebook content was read"}
                continue
            try:
                results[path] = cell_diff(sides[0], sides[1], path, bool(options.get("outputs")))
            except (RecursionError, MemoryError):
                results[path] = {"error": "too complex to diff by cell"}
            except Exception as exc:  # nbdime on a malformed notebook: any error means "as JSON"
                results[path] = {"error": f"not a notebook nbdime reads ({type(exc).__name__})"}
    if listing.get("error"):
        results[""] = {"error": listing["error"]}
    return results

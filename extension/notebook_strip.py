"""Notebooks as a push commits them: validated by nbformat, and without outputs unless asked.

Outputs hold data (rows of a data frame, a plotted image, a token echoed by mistake), make every
re-run a diff and bloat history, so a push strips them by default, as nbstripout does: outputs,
execution counts, and the metadata a front end adds for itself (timings, scroll and collapse
state, widget state, the trust signature). ``%tabbi push --keep-outputs`` keeps them.

This module does only the notebook work, on parsed notebooks: it runs in the notebook worker
(``notebook_files``) for the agent's notebooks, and in a server thread for the small notebook a
push of cells makes (``cells.py``). Nothing of the agent's repository runs for it: no nbstripout
filter of its ``.gitattributes``, no hook.
"""

from __future__ import annotations

import copy
from typing import Any

#: Cell metadata a front end writes for itself (nbstripout's default list).
CELL_METADATA = ("collapsed", "scrolled", "ExecuteTime", "execution", "heading_collapsed", "hidden")
#: Notebook metadata of the same kind.
NOTEBOOK_METADATA = ("signature", "widgets")


def strip(notebook: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``notebook`` (nbformat 4) without outputs, execution counts or transient metadata."""
    clean = copy.deepcopy(notebook)
    metadata = clean.get("metadata")
    if isinstance(metadata, dict):
        for key in NOTEBOOK_METADATA:
            metadata.pop(key, None)
    for cell in clean.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        if isinstance(cell.get("metadata"), dict):
            for key in CELL_METADATA:
                cell["metadata"].pop(key, None)
    return clean


def first_error(notebook: dict[str, Any]) -> str | None:
    """nbformat's first validation error of ``notebook``, said in one line, or None when valid."""
    from nbformat.validator import iter_validate

    try:
        error = next(iter(iter_validate(copy.deepcopy(notebook))), None)
    except RecursionError:
        return "it is nested too deeply to validate"
    except Exception as exc:  # nbformat refusing the version or shape before the schema
        return f"{type(exc).__name__}: {exc}"[:300]
    if error is None:
        return None
    where = "/".join(str(part) for part in getattr(error, "absolute_path", []) or [])
    message = " ".join(str(getattr(error, "message", error)).split())
    if len(message) > 240:
        message = message[:239] + "…"
    return f"{message} (at /{where})" if where else message


def dumps(notebook: dict[str, Any]) -> str:
    """The notebook as Jupyter saves it (one-space indent, sorted keys, a final newline)."""
    import nbformat

    return nbformat.writes(nbformat.from_dict(notebook), version=nbformat.NO_CONVERT)


def from_cells(cells: list[dict[str, Any]], keep_outputs: bool) -> str:
    """A valid nbformat 4 notebook of ``cells`` (as ``cells.from_request`` checked them); raises
    ``ValueError`` naming the first validation error."""
    from nbformat import v4

    made = []
    for cell in cells:
        fields: dict[str, Any] = {"source": cell["source"], "metadata": cell.get("metadata") or {}}
        if cell.get("id"):
            fields["id"] = cell["id"]
        kinds = {"code": v4.new_code_cell, "markdown": v4.new_markdown_cell}
        made.append(kinds.get(cell["cell_type"], v4.new_raw_cell)(**fields))
        if cell["cell_type"] == "code":  # set after: the notebook is validated as a whole below
            made[-1].update(outputs=cell.get("outputs") or [], execution_count=cell.get("execution_count"))
    notebook = {"cells": made, "metadata": {}, "nbformat": v4.nbformat, "nbformat_minor": v4.nbformat_minor}
    if not keep_outputs:
        notebook = strip(notebook)
    error = first_error(notebook)
    if error:
        raise ValueError(error)
    return dumps(notebook)


def strip_all(listing: dict[str, Any], options: dict[str, Any], parse: Any) -> dict[str, Any]:
    """The worker's ``strip`` task: each changed notebook validated, then stripped unless
    ``keep_outputs``. ``{"files": {path: content}}`` (only notebooks whose content changes), or
    ``{"error": ...}`` naming the first notebook that cannot be pushed and why."""
    if listing.get("error"):
        return {"error": listing["error"]}
    if listing.get("omitted"):
        return {"error": f"more than {len(listing['notebooks'])} notebooks changed; "
                         "tabbi checks at most that many per push"}
    files: dict[str, str] = {}
    for entry in listing.get("notebooks", []):
        path = entry.get("path", "")
        if entry.get("status") == "deleted" or (entry.get("new") is None and not entry.get("skipped")):
            continue
        if entry.get("skipped"):
            return {"error": f"{path} cannot be checked: its {entry['skipped']}"}
        notebook, why = parse(entry["new"])
        if why:
            return {"error": f"{path} is not a valid notebook: it is {why}"}
        error = first_error(notebook)
        if error:
            return {"error": f"{path} is not a valid notebook: {error}"}
        if not options.get("keep_outputs"):
            clean = strip(notebook)
            if clean != notebook:
                files[path] = dumps(clean)
    return {"files": files}

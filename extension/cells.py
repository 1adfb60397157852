"""Notebook cells as a file in the repository: which cells (by tag, number or id), and the file.

The form is a Python file in the percent format (``# %%`` between cells; Jupytext, VS Code and
PyCharm read it as cells): it diffs and reviews like code, carries no outputs or execution
counts, and is deterministic, so the same cells always give the same bytes and pushing twice
without edits commits nothing. Markdown cells become comment blocks (``# %% [markdown]``);
IPython magics and shell escapes are commented out (``# %time``), as Jupytext does, so the file
stays valid Python.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from . import notebook_strip
from .notebook_files import MAX_DEPTH, depth_within
from .validation import ValidationError
from .workspace import check_relative_path

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_TAG = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
_MAGIC = re.compile(r"^\s*[%!]")
MAX_SELECTOR_CHARS = 500


def select(notebook: dict[str, Any], selector: str) -> list[dict[str, Any]]:
    """The cells ``selector`` names, in notebook order: comma-separated tags, 1-based numbers or
    ranges (``3``, ``5-7``), and cell ids (``id:1a2b``)."""
    if not isinstance(selector, str) or not selector.strip() or len(selector) > MAX_SELECTOR_CHARS:
        raise ValidationError("'cells' names the cells to push: a tag, numbers like 2,4-6, or id:CELLID")
    cells = notebook.get("cells") or []
    chosen: set[int] = set()
    for item in (part.strip() for part in selector.split(",")):
        if not item:
            continue
        numbers = _RANGE.match(item)
        if numbers:
            first, last = int(numbers.group(1)), int(numbers.group(2) or numbers.group(1))
            if not 1 <= first <= last <= len(cells):
                raise ValidationError(f"cell numbers {item} are outside 1-{len(cells)}")
            chosen.update(range(first - 1, last))
        elif item.startswith("id:"):
            found = [i for i, c in enumerate(cells) if c.get("id") == item[3:]]
            if not found:
                raise ValidationError(f"no cell has the id {item[3:]!r}")
            chosen.update(found)
        elif _TAG.match(item):
            found = [i for i, c in enumerate(cells) if item in (c.get("metadata", {}).get("tags") or [])]
            if not found:
                raise ValidationError(
                    f"no cell is tagged {item!r} (add the tag in the cell's property inspector, "
                    "and save the notebook)"
                )
            chosen.update(found)
        else:
            raise ValidationError(f"cannot read {item!r} as a tag, a cell number or id:CELLID")
    return [cells[i] for i in sorted(chosen)]


def render(cells: list[dict[str, Any]], notebook_path: str, selector: str) -> str:
    name = posixpath.basename(notebook_path)
    blocks = [f"# Cells {selector} of {name}, pushed by tabbi. Edit them in the notebook."]
    for cell in cells:
        source = _source(cell).rstrip("\n")
        if cell.get("cell_type") == "markdown":
            lines = [("# " + line).rstrip() for line in source.splitlines()]
            blocks.append("\n".join(["# %% [markdown]", *lines]))
        elif cell.get("cell_type") == "code":
            lines = [("# " + line if _MAGIC.match(line) else line) for line in source.splitlines()]
            blocks.append("\n".join(["# %%", *lines]))
    return "\n\n".join(blocks) + "\n"


def default_path(notebook_path: str, selector: str) -> str:
    stem = posixpath.splitext(posixpath.basename(notebook_path))[0] or "notebook"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)
    suffix = (
        "" if not _TAG.match(selector) or _RANGE.match(selector) or selector.startswith("id:") else selector
    )
    return f"notebooks/{stem}{'-' + re.sub(r'[^A-Za-z0-9_.-]+', '_', suffix) if suffix else ''}.py"


def file_for(notebook: dict[str, Any], notebook_path: str, selector: str, to: str | None,
             keep_outputs: bool = False) -> tuple[str, str]:
    """``(path in the repository, content)`` for the selected cells: a notebook when ``to`` ends
    in ``.ipynb`` (outputs only with ``keep_outputs``; checked by nbformat, so it runs in a
    thread), else the percent-format file."""
    path = check_relative_path(to) if to else default_path(notebook_path, selector)
    if path == ".git" or path.startswith(".git/"):
        raise ValidationError("cells cannot be written into .git")
    chosen = select(notebook, selector)
    if path.endswith(".ipynb"):
        try:
            return path, notebook_strip.from_cells(chosen, keep_outputs)
        except ValueError as exc:
            raise ValidationError(f"the cells do not make a valid notebook: {exc}") from None
    return path, render(chosen, notebook_path, selector)


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source") or ""
    return "".join(source) if isinstance(source, list) else str(source)


#: What a push may carry of a notebook: its cells' sources, sent by the kernel (which reads the
#: notebook as its person; the server may be another OS user's, the hub's service). The request
#: body's own limit (handlers.MAX_BODY_BYTES) bounds the total.
MAX_CELLS = 10_000
MAX_TAGS = 50
MAX_NAME_CHARS = 255
MAX_OUTPUTS = 1000
_CELL_TYPES = ("code", "markdown", "raw")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def from_request(value: object) -> tuple[str, dict[str, Any]]:
    """``(notebook name, notebook)`` from a push's ``cells`` object, ``{notebook, cells: [{cell_type,
    source, id?, tags?}], select, to?, only?}``, checked field by field: only the shapes above
    get through, and nothing of them names a file of the server's."""
    if not isinstance(value, dict):
        raise ValidationError("'cells' must be an object: {notebook, cells, select, to?, only?}")
    name = value.get("notebook")
    if (not isinstance(name, str) or not name.endswith(".ipynb") or len(name) > 1000 or "\0" in name
            or len(posixpath.basename(name.replace("\\", "/"))) > MAX_NAME_CHARS):
        raise ValidationError("'cells.notebook' must be the name of a saved .ipynb notebook")
    raw = value.get("cells")
    if not isinstance(raw, list) or len(raw) > MAX_CELLS:
        raise ValidationError(
            f"'cells.cells' must be the notebook's cells (at most {MAX_CELLS}), as the kernel "
            "reads them from the saved notebook (%tabbi push --cells, or Session.push(cells=...))")
    return posixpath.basename(name.replace("\\", "/")), {"cells": [_cell(c, i) for i, c in enumerate(raw, 1)]}


def _cell(value: object, number: int) -> dict[str, Any]:
    where = f"'cells.cells' item {number}"
    if not isinstance(value, dict) or value.get("cell_type") not in _CELL_TYPES:
        raise ValidationError(f"{where} must be an object whose cell_type is one of {', '.join(_CELL_TYPES)}")
    source = value.get("source", "")
    if isinstance(source, list) and all(isinstance(part, str) for part in source):
        source = "".join(source)
    if not isinstance(source, str):
        raise ValidationError(f"{where}: 'source' must be text")
    cell: dict[str, Any] = {"cell_type": value["cell_type"], "source": source,
                            "metadata": {"tags": _tags(value.get("tags"), where)}}
    if value.get("id") is not None:
        if not isinstance(value["id"], str) or not _ID.match(value["id"]):
            raise ValidationError(f"{where}: 'id' must be a notebook cell id (letters, digits, - and _)")
        cell["id"] = value["id"]
    if value["cell_type"] == "code" and ("outputs" in value or "execution_count" in value):
        # Sent with --keep-outputs only; their shape is nbformat's to check (file_for).
        outputs, count = value.get("outputs") or [], value.get("execution_count")
        if (not isinstance(outputs, list) or len(outputs) > MAX_OUTPUTS
                or not all(isinstance(o, dict) for o in outputs) or not depth_within(outputs, MAX_DEPTH)):
            raise ValidationError(f"{where}: 'outputs' must be at most {MAX_OUTPUTS} notebook outputs")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
            raise ValidationError(f"{where}: 'execution_count' must be a whole number or null")
        cell.update(outputs=outputs, execution_count=count)
    return cell


def _tags(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) > MAX_TAGS
            or not all(isinstance(tag, str) and len(tag) <= 100 for tag in value)):
        raise ValidationError(f"{where}: 'tags' must be at most {MAX_TAGS} short texts")
    return value

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


def file_for(notebook: dict[str, Any], notebook_path: str, selector: str, to: str | None) -> tuple[str, str]:
    """``(path in the repository, content)`` for the selected cells."""
    path = check_relative_path(to) if to else default_path(notebook_path, selector)
    if path == ".git" or path.startswith(".git/"):
        raise ValidationError("cells cannot be written into .git")
    return path, render(select(notebook, selector), notebook_path, selector)


def _source(cell: dict[str, Any]) -> str:
    source = cell.get("source") or ""
    return "".join(source) if isinstance(source, list) else str(source)

"""Context the person chooses: attachments gathered in the kernel, shown before they are sent.

Nothing of the notebook reaches the agent unless it is named: a variable (``df_sales``), cells
(``@cell:3``, ``@cell:2-4``, ``@cells``), the last error (``@error``) or a file of the kernel's
working directory (``@file:data/schema.sql``). The same specs serve the magics
(``%%tabbi --with df_sales,@error``), the Python API (``session.ask(text, attach=[...])``) and the
chat panel's chips.

Why describe rather than copy: a data frame of a gigabyte must cost milliseconds to attach, so a
frame becomes its schema, shape and a few rows (``dtypes``, ``shape``, ``head``: none of them
touches more than a few rows), an array its shape, dtype and a handful of elements, anything else
a bounded ``repr``. Every piece has a byte limit; when it is cut, its text says so and it carries
``truncated``. The server checks the same limits again (``extension/validation.py``).

Cell numbers are the ones the notebook shows beside a cell that ran (``[3]``): ``In[3]`` of
this kernel's history, as executed. ``@cells`` is the saved notebook (read the way ``%tabbi push
--cells`` reads it), or this kernel's history when the kernel does not know its notebook.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import stat
import sys
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

#: The kinds the server accepts (``extension/validation.py`` holds the same set).
KINDS = ("variable", "cells", "error", "file")

#: Bytes of content per kind (UTF-8), the truncation note included. The server's limit per piece
#: (64 KiB) is above every one of them.
LIMITS = {"variable": 8_000, "cells": 32_000, "error": 16_000, "file": 48_000}

#: Bytes of a traceback kept (its end) in ``@error``, leaving room for the cell's source.
TRACEBACK_TAIL = 10_000

#: Rows and columns of a data frame shown; characters of one value in those rows.
HEAD_ROWS = 5
HEAD_COLUMNS = 20
SCHEMA_COLUMNS = 200
VALUE_CHARS = 40

#: Names a fix never sends: IPython's own, and what is not data.
_HIDDEN = {"In", "Out", "get_ipython", "exit", "quit", "open"}

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CELL = re.compile(r"^@cell:(\d+)(?:-(\d+))?$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ContextError(ValueError):
    """An attachment that cannot be made (unknown name, no error yet, a refused file); the
    message says what to do. Nothing is sent."""


@dataclass(frozen=True)
class Attachment:
    kind: str
    label: str
    content: str
    truncated: bool = False

    @property
    def size(self) -> int:
        return len(self.content.encode("utf-8"))

    def to_dict(self) -> dict[str, Any]:
        """What ``POST .../prompt`` takes in ``attachments``."""
        return {"kind": self.kind, "label": self.label, "content": self.content, "truncated": self.truncated}

    def describe(self) -> str:
        """One line for "what is attached": label, kind, size, truncated."""
        cut = ", truncated" if self.truncated else ""
        return f"{self.label} ({self.kind}, {human_bytes(self.size)}{cut})"


def human_bytes(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1000:.1f} KB" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def clip(text: str, limit: int, total: int | None = None) -> tuple[str, bool]:
    """``text`` cut to ``limit`` UTF-8 bytes with a note saying how much shows, and whether it was
    cut. ``total``: the size of what ``text`` was already taken from, when larger."""
    raw = text.encode("utf-8")
    whole = max(total or 0, len(raw))
    if len(raw) <= limit and whole == len(raw):
        return text, False
    keep = max(0, limit - 80)  # room for the note
    shown = raw[:keep].decode("utf-8", errors="ignore")
    note = f"\n[truncated: {len(shown.encode('utf-8')):,} of {whole:,} bytes shown]"
    return shown + note, True


def _attachment(kind: str, label: str, text: str, total: int | None = None) -> Attachment:
    content, truncated = clip(text, LIMITS[kind], total)
    return Attachment(kind, label, content, truncated)


# -- parsing --------------------------------------------------------------------------------------
def parse_specs(value: str | Iterable[str] | None) -> list[str]:
    """``"df,@cell:3, @error"`` (or a list of such strings) -> ``["df", "@cell:3", "@error"]``,
    duplicates dropped, order kept."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        for spec in str(item).split(","):
            spec = spec.strip()
            if spec and spec not in out:
                out.append(spec)
    return out


def gather(specs: str | Iterable[Any] | None, shell: Any = None) -> list[Attachment]:
    """The attachments for ``specs`` (strings as above, or ready ``Attachment``\\ s), read from
    ``shell`` (IPython's; the running one when None). Raises ``ContextError`` for the first that
    cannot be made, so that nothing is sent half-attached."""
    shell = shell if shell is not None else _shell()
    items = [specs] if isinstance(specs, str) else list(specs or [])
    ready = [s for s in items if isinstance(s, Attachment)]
    texts = parse_specs([s for s in items if not isinstance(s, Attachment)])
    return ready + [one(spec, shell) for spec in texts]


def one(spec: str, shell: Any) -> Attachment:
    if spec == "@error":
        return last_error(shell)
    if spec == "@cells":
        return all_cells(shell)
    if spec.startswith("@cell:"):
        return cells(spec, shell)
    if spec.startswith("@file:"):
        return read_file(spec[len("@file:"):])
    if spec.startswith("@"):
        raise ContextError(f"unknown attachment {spec!r}: use a variable name, @cell:N, @cell:N-M, "
                           "@cells, @error or @file:PATH")
    if not _NAME.match(spec):
        raise ContextError(f"{spec!r} is not a variable name")
    return variable(spec, lookup(spec, _namespace(shell)))


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def _namespace(shell: Any) -> Mapping[str, Any]:
    if shell is None:
        raise ContextError("attaching variables, cells or errors needs an IPython kernel")
    return shell.user_ns


def lookup(name: str, namespace: Mapping[str, Any]) -> Any:
    """``df`` or ``obj.attr`` in ``namespace`` (attributes are read, never called)."""
    head, *rest = name.split(".")
    if head not in namespace:
        raise ContextError(f"no variable {head!r} in this kernel (run the cell that defines it first)")
    value = namespace[head]
    for attr in rest:
        try:
            value = getattr(value, attr)
        except Exception as exc:
            raise ContextError(f"cannot read {name}: {type(exc).__name__}: {exc}") from None
    return value


# -- variables ------------------------------------------------------------------------------------
def variable(name: str, value: Any) -> Attachment:
    """A description of ``value``: never a copy of its data (see the module's docstring)."""
    return _attachment("variable", name, f"{name}: {describe(value)}")


def describe(value: Any) -> str:
    kind = type(value)
    module = kind.__module__.split(".")[0]
    name = kind.__name__
    try:
        if module == "pandas" and name == "DataFrame":
            return _pandas_frame(value)
        if module == "pandas" and name == "Series":
            return _pandas_series(value)
        if module == "polars" and name == "DataFrame":
            return _polars_frame(value)
        if module == "polars" and name == "LazyFrame":
            schema = value.collect_schema()  # the plan's schema; nothing is computed
            return f"polars.LazyFrame (not collected), {len(schema)} columns\n" + _schema(schema.items())
        if module == "polars" and name == "Series":
            return (f"polars.Series {value.name!r}, dtype {value.dtype}, length {len(value):,}\n"
                    f"head({HEAD_ROWS}): {_bounded(value.head(HEAD_ROWS).to_list())}")
        if module == "numpy" and name == "ndarray":
            return _numpy(value)
    except ContextError:
        raise
    except Exception as exc:  # a describer's failure must not hide the rest: say it, use repr
        return f"{module}.{name} (could not be described: {type(exc).__name__}: {exc})\n{_bounded(value)}"
    return f"{module}.{name}: {_bounded(value)}" if module != "builtins" else f"{name}: {_bounded(value)}"


def _schema(items: Iterable[tuple[Any, Any]]) -> str:
    lines = []
    for n, (column, dtype) in enumerate(items):
        if n == SCHEMA_COLUMNS:
            lines.append("  ... (the rest of the columns not listed)")
            break
        lines.append(f"  {column}: {dtype}")
    return "columns (name: dtype):\n" + "\n".join(lines)


def _pandas_frame(df: Any) -> str:
    rows, columns = df.shape
    head = df.iloc[:HEAD_ROWS, :HEAD_COLUMNS]  # a view of a few rows: no copy of the frame
    more = f" (first {HEAD_COLUMNS} columns)" if columns > HEAD_COLUMNS else ""
    table = head.to_string(max_colwidth=VALUE_CHARS, show_dimensions=False)
    return (f"pandas.DataFrame, {rows:,} rows x {columns:,} columns\n"
            f"{_schema(zip(df.columns, df.dtypes, strict=False))}\n"
            f"index: {type(df.index).__name__}\nhead({HEAD_ROWS}){more}:\n{table}")


def _pandas_series(series: Any) -> str:
    head = series.iloc[:HEAD_ROWS].to_string(max_rows=HEAD_ROWS)
    return (f"pandas.Series {series.name!r}, dtype {series.dtype}, length {len(series):,}\n"
            f"head({HEAD_ROWS}):\n{head}")


def _polars_frame(df: Any) -> str:
    rows, columns = df.shape
    head = df.select(df.columns[:HEAD_COLUMNS]).head(HEAD_ROWS)
    more = f" (first {HEAD_COLUMNS} columns)" if columns > HEAD_COLUMNS else ""
    return (f"polars.DataFrame, {rows:,} rows x {columns:,} columns\n{_schema(df.schema.items())}\n"
            f"head({HEAD_ROWS}){more}:\n{head}")


def _numpy(array: Any) -> str:
    sample = array.flat[:10].tolist() if array.size else []  # ten elements, never a copy of all
    more = f" ... ({array.size:,} elements)" if array.size > 10 else ""
    return (f"numpy.ndarray, shape {array.shape}, dtype {array.dtype}, {array.nbytes:,} bytes\n"
            f"first elements (flattened): {_bounded(sample)}{more}")


def _bounded(value: Any) -> str:
    """A ``repr`` bounded in size (containers shortened, strings cut) and never raising."""
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring, shortener.maxother, shortener.maxlevel = 400, 400, 3
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 30
    try:
        text = shortener.repr(value)
    except Exception as exc:
        return f"<repr failed: {type(exc).__name__}>"
    return text if len(text) <= 2000 else text[:2000] + "..."


# -- cells ----------------------------------------------------------------------------------------
def _history(shell: Any) -> list[str]:
    return list(_namespace(shell).get("In") or [])


def cells(spec: str, shell: Any) -> Attachment:
    """``@cell:3`` / ``@cell:2-4``: the cells that ran as ``[3]`` (``In[3]``), as executed."""
    match = _CELL.match(spec)
    if not match:
        raise ContextError(f"{spec!r}: write @cell:N or @cell:N-M (the numbers shown beside the cells)")
    first = int(match.group(1))
    last = int(match.group(2) or first)
    history = _history(shell)
    if first < 1 or last < first:
        raise ContextError(f"{spec!r}: the range must go from 1 up")
    if last >= len(history):
        raise ContextError(f"{spec}: this kernel has run {max(len(history) - 1, 0)} cells so far")
    text = "\n\n".join(f"# In[{n}]:\n{history[n]}" for n in range(first, last + 1))
    return _attachment("cells", spec, text)


def all_cells(shell: Any) -> Attachment:
    """``@cells``: the saved notebook's cells (code and Markdown, no outputs), else the history."""
    from .client import TabbiError, notebook_cells

    path = os.environ.get("JPY_SESSION_NAME")
    if path and path.endswith(".ipynb"):
        try:
            saved = notebook_cells(path)
        except TabbiError:
            saved = None
        if saved is not None:
            parts = [f"# cell {n} ({c.get('cell_type')}):\n{_source(c.get('source'))}"
                     for n, c in enumerate(saved, 1)]
            header = f"the saved notebook {os.path.basename(path)} ({len(saved)} cells)\n\n"
            return _attachment("cells", "@cells", header + "\n\n".join(parts))
    history = _history(shell)
    parts = [f"# In[{n}]:\n{source}" for n, source in enumerate(history) if n and source.strip()]
    return _attachment("cells", "@cells", "this kernel's cells as executed\n\n" + "\n\n".join(parts))


def _source(source: Any) -> str:
    return "".join(source) if isinstance(source, list) else str(source or "")


# -- the last error -------------------------------------------------------------------------------
@dataclass
class FailedCell:
    source: str
    execution_count: int | None


#: The last cell whose execution raised, recorded by the ``post_run_cell`` hook.
_failed: dict[int, FailedCell] = {}


def install(shell: Any) -> None:
    """Record the source of each cell that raises (at ``%load_ext``; idempotent)."""
    if shell is None or getattr(shell, "_tabbi_context_hook", False):
        return

    def record(result: Any) -> None:
        if getattr(result, "error_in_exec", None) is not None:
            info = getattr(result, "info", None)
            _failed[id(shell)] = FailedCell(getattr(info, "raw_cell", "") or "", result.execution_count)

    shell.events.register("post_run_cell", record)
    shell._tabbi_context_hook = True


def failed_cell(shell: Any) -> FailedCell | None:
    return _failed.get(id(shell))


def last_exception() -> BaseException | None:
    """The last uncaught exception of a cell (IPython keeps it in ``sys.last_value``)."""
    value = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    return value if isinstance(value, BaseException) else None


def last_error(shell: Any) -> Attachment:
    """``@error``: the last error's traceback (plain text) and the source of the cell that raised."""
    exc = last_exception()
    if exc is None:
        raise ContextError("no error yet: @error attaches the last exception a cell raised")
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = _ANSI.sub("", "".join(lines)).rstrip()
    raw, cut = text.encode("utf-8"), False
    if len(raw) > TRACEBACK_TAIL:  # the end says what failed where: keep it, and the cell below
        kept = raw[-TRACEBACK_TAIL:].decode("utf-8", errors="ignore")
        shown = len(kept.encode("utf-8"))
        text = f"[truncated: {shown:,} of {len(raw):,} bytes shown: the traceback's end]\n{kept}"
        cut = True
    cell = failed_cell(shell) if shell is not None else None
    if cell is not None:
        where = f"In[{cell.execution_count}]" if cell.execution_count else "the cell"
        text += f"\n\nThe cell that raised it ({where}):\n{cell.source}"
    else:
        text += "\n\n(the cell that raised it is not known: it ran before %load_ext tabbi_kernel)"
    found = _attachment("error", "@error", text)
    return Attachment(found.kind, found.label, found.content, found.truncated or cut)


def names_used(source: str) -> list[str]:
    """The names ``source`` reads, in order of appearance (for the fix: the variables to send)."""
    try:
        tree = ast.parse(source)
        found = [node.id for node in ast.walk(tree) if isinstance(node, ast.Name)]
        found.sort(key=lambda n: source.find(n))
    except SyntaxError:  # magics and shell escapes: the identifiers then
        found = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", source)
    out: list[str] = []
    for name in found:
        if name not in out:
            out.append(name)
    return out


def fix_variables(shell: Any, source: str, limit: int = 8) -> list[str]:
    """The data the failing cell names: variables of the namespace that are not modules, functions,
    classes, builtins or IPython's own (at most ``limit``)."""
    import types

    namespace = _namespace(shell)
    chosen = []
    for name in names_used(source):
        if name.startswith("_") or name in _HIDDEN or name not in namespace:
            continue
        value = namespace[name]
        if isinstance(value, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)) \
                or value is getattr(builtins, name, object()):
            continue
        chosen.append(name)
        if len(chosen) == limit:
            break
    return chosen


FIX_PROMPT = (
    "A cell of my notebook failed; the error with its traceback and the cell are attached{vars}. "
    "Find the cause in this repository's code and fix it there (not in the notebook: I will "
    "re-run the cell against your branch). Say briefly what was wrong and what you changed."
)


def fix_request(shell: Any, extra: str = "") -> tuple[str, list[Attachment]]:
    """The prompt and attachments of a fix: the last error (traceback and cell) and the variables
    the failing cell names. ``ContextError`` when there is no error yet."""
    shell = shell if shell is not None else _shell()
    error = last_error(shell)
    cell = failed_cell(shell) if shell is not None else None
    names = fix_variables(shell, cell.source) if cell is not None else []
    attachments = [error] + [variable(n, lookup(n, _namespace(shell))) for n in names]
    vars_note = f", with the variables it uses ({', '.join(names)})" if names else ""
    text = FIX_PROMPT.format(vars=vars_note)
    if extra.strip():
        text += "\n\n" + extra.strip()
    return text, attachments


# -- files ----------------------------------------------------------------------------------------
def read_file(path: str, root: str | None = None) -> Attachment:
    """``@file:PATH``: a text file under the working directory ``root`` (the kernel's). Refused:
    absolute paths, paths (or links) leading out of it, anything not a regular file, binary files."""
    label = f"@file:{path}"
    if not path or os.path.isabs(path) or path.startswith("~"):
        raise ContextError(f"{label}: give a path relative to the notebook's folder")
    base = os.path.realpath(root or os.getcwd())
    real = os.path.realpath(os.path.join(base, path))
    if real != base and not real.startswith(base.rstrip("/") + "/"):
        raise ContextError(f"{label}: the path leads out of the notebook's folder ({base})")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise ContextError(f"{label}: no such file") from None
    except OSError as exc:
        raise ContextError(f"{label}: cannot open it ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ContextError(f"{label}: not a regular file")
        raw = f.read(LIMITS["file"] + 4)
    if b"\0" in raw[:8192]:
        raise ContextError(f"{label}: a binary file; only text files can be attached")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if len(raw) <= LIMITS["file"] or exc.start < len(raw) - 4:  # not a character cut at the end
            raise ContextError(f"{label}: not UTF-8 text; only text files can be attached") from None
        text = raw[:exc.start].decode("utf-8")
    return _attachment("file", label, text, total=info.st_size)


# -- what the panel offers ------------------------------------------------------------------------
def offers(shell: Any) -> list[dict[str, str]]:
    """What the panel's "+ context" lists: the kernel's data frames and arrays (by type, nothing
    read), ``@error`` when there is one, ``@cells``."""
    namespace = _namespace(shell)
    out = []
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in _HIDDEN:
            continue
        kind = type(value)
        module, type_name = kind.__module__.split(".")[0], kind.__name__
        if (module, type_name) in {("pandas", "DataFrame"), ("pandas", "Series"), ("polars", "DataFrame"),
                                   ("polars", "LazyFrame"), ("polars", "Series"), ("numpy", "ndarray")}:
            out.append({"spec": name, "kind": "variable", "what": f"{module}.{type_name}"})
    if last_exception() is not None:
        out.append({"spec": "@error", "kind": "error", "what": "the last error and its cell"})
    out.append({"spec": "@cells", "kind": "cells", "what": "all cells of this notebook"})
    return out

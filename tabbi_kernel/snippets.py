"""``%tabbi insert``: the code the agent produced in its last turn, as notebook cell source.

What counts: Python files the agent wrote or edited in that turn (their content at the end of the
turn), and fenced code blocks in its text (```python, ```py, ```ipython or no language), in the
order they were produced. Each piece starts with a ``# %%`` marker and a comment saying where it
came from.

Why one cell: a kernel can create only one new cell per execution (``set_next_input``; JupyterLab
keeps the last). So tabbi inserts one cell in percent format: JupyterLab's "Split Cell" (Ctrl+Shift+-)
at a marker makes separate cells, and VS Code and jupytext read the markers as cell boundaries.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .conversation import Conversation, Turn

CODE_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_FENCES = {"", "python", "py", "python3", "ipython"}
PYTHON_FILES = (".py", ".pyw", ".ipy")


@dataclass
class Snippet:
    origin: str  # what the marker comment says
    code: str
    path: str | None = None  # the file it came from, if any
    verbs: list[str] = field(default_factory=list)  # written, edited


def latest_code(conversation: Conversation, read_file: Callable[[str], str] | None = None,
                ) -> tuple[Turn, list[Snippet]] | None:
    """The newest finished turn that produced Python code, with its snippets: an aborted or
    chatty turn after it does not hide it (``%tabbi insert`` and the panel's "Insert code")."""
    for turn in conversation.finished_turns():
        snippets = turn_snippets(conversation, turn, read_file)
        if snippets:
            return turn, snippets
    return None


def earlier_note(conversation: Conversation, turn: Turn) -> str:
    """Says when the code comes from a turn before the last one."""
    return "" if conversation.last_finished_turn() is turn else f" (from an earlier turn: {turn.text[:60]!r})"


def turn_snippets(conversation: Conversation, turn: Turn,
                  read_file: Callable[[str], str] | None = None) -> list[Snippet]:
    """The turn's Python code in order; a file changed several times is one snippet with its text
    at the end of the turn (read back through ``read_file`` when given)."""
    snippets: list[Snippet] = []
    files: dict[str, Snippet] = {}
    for message in conversation.turn_messages(turn):
        if message["role"] != "assistant":
            continue
        for part in message["parts"]:
            if part["type"] == "text":
                for lang, code in CODE_FENCE.findall(part.get("text", "")):
                    if lang.lower() in PYTHON_FENCES and code.strip():
                        snippets.append(Snippet("a code block in the agent's reply", code))
            elif part["type"] == "tool" and part.get("status") == "completed":
                args = part.get("input") or {}
                path = args.get("filePath") or ""
                if part.get("tool") not in ("write", "edit") or not path.endswith(PYTHON_FILES):
                    continue
                if path not in files:
                    files[path] = Snippet("", args.get("content", ""), path)
                    snippets.append(files[path])
                files[path].verbs.append("written" if part["tool"] == "write" else "edited")
                if part["tool"] == "write":
                    files[path].code = args.get("content", "")
    for path, snippet in files.items():
        snippet.origin = f"{path} ({', '.join(dict.fromkeys(snippet.verbs))} by the agent)"
        if read_file is not None:
            with contextlib.suppress(Exception):  # keep what the tool call carried
                snippet.code = read_file(path)
    return [s for s in snippets if s.code.strip()]


def cell_source(snippets: list[Snippet]) -> str:
    blocks = []
    for snippet in snippets:
        origin = snippet.origin.replace("\n", " ")
        blocks.append(f"# %% [tabbi] from {origin}\n{snippet.code.rstrip()}\n")
    return "\n".join(blocks)

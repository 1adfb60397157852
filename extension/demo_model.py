"""tabbi's demo model: a way to try the whole flow without an API key (``TABBI_MODEL=demo``, or
``%tabbi start REPO --model demo``).

It is not a language model and says so in every reply. It follows one fixed recipe on the
workspace, through OpenCode's own tools, so the session, the tool calls, the diff, ``insert`` and
``push`` all work for real: find the file the request names (``glob``), read it if it exists
(``read``), write a small change (``write``), then say what it did. The change: for "a function
``name(args)`` in ``file.py``" it adds that function (a real body for the few it knows, such as the
quickstart's ``slugify``, else a stub that raises ``NotImplementedError``); otherwise it notes the
request in the named file, or in ``tabbi-demo-notes.md``. Same request, same workspace: same
answer.

It runs in the Jupyter server as an OpenAI-compatible server on 127.0.0.1 (``chat_completions``),
started on first use, with a random key only the model gateway holds: sandboxes reach it through
the gateway like any model (``docs/security.md``).
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from .chat_completions import ChatCompletionsServer, Reply, glob, read, write
from .model_config import DEMO_MODEL, Upstream

log = logging.getLogger(__name__)

LABEL = "(tabbi demo model)"
TITLE = "tabbi demo session"
NOTES = "tabbi-demo-notes.md"
DISCLAIMER = (
    "I am tabbi's demo model: I follow a fixed recipe (find the file, read it, write a small "
    "change) and do not understand requests. Pick a real model (TABBI_MODEL, or --model) for "
    "real work."
)

#: Functions the demo writes for real (the quickstart asks for ``slugify``).
RECIPES = {
    "slugify": 'def slugify(text):\n    return "-".join(text.lower().split())\n',
}

_FUNCTION = re.compile(r"\b([A-Za-z_]\w*)\(([\w\s,=*]*)\)")
# A relative path inside the workspace: no leading "/", no "..", a known kind of text file.
_FILE = re.compile(
    r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.(?:py|md|txt|rst|toml|ya?ml|json|cfg|ini|js|ts|sh|r|R))\b"
)
_COMMENT = {".py": "# ", ".toml": "# ", ".yaml": "# ", ".yml": "# ", ".cfg": "# ", ".ini": "; ",
            ".sh": "# ", ".r": "# ", ".R": "# ", ".js": "// ", ".ts": "// "}


@dataclass(frozen=True)
class Plan:
    """What the demo will do for one request."""

    target: str
    addition: str
    #: What the final answer says was done.
    summary: str


def plan(prompt: str) -> Plan:
    first_line = " ".join(prompt.split())[:100] or "(empty request)"
    file = _FILE.search(prompt)
    function = _FUNCTION.search(prompt)
    if file and function and file.group(1).endswith(".py"):
        name, params = function.group(1), " ".join(function.group(2).split())
        body = RECIPES.get(name) or (
            f"def {name}({params}):\n"
            f'    """{first_line.replace(chr(34), chr(39))}"""\n'
            f'    raise NotImplementedError("a stub by tabbi\'s demo model")\n'
        )
        kind = "" if name in RECIPES else "a stub of "
        return Plan(file.group(1), body, f"Added {kind}`{name}({params})` to {file.group(1)}.")
    target = file.group(1) if file else NOTES
    suffix = target[target.rfind("."):]
    if suffix in (".md", ".txt", ".rst"):
        note = f"- {first_line} (noted by tabbi's demo model)\n"
    else:
        note = f"{_COMMENT.get(suffix, '# ')}TODO: {first_line} (noted by tabbi's demo model)\n"
    return Plan(target, note, f"Noted your request in {target}.")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _file_content(read_result: str) -> str | None:
    """The file's text from OpenCode's ``read`` output (numbered lines), None if only part of it
    was shown (a long file, or long lines cut short)."""
    match = re.search(r"<content>\n(.*?)\n\(End of file[^\n]*\)\n</content>", read_result, re.S)
    if match is None:
        return None
    lines = []
    for line in match.group(1).split("\n"):
        numbered = re.match(r"\d+: ?(.*)\Z", line)
        if numbered:
            lines.append(numbered.group(1))
        elif line:
            return None
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n" if lines else ""


def _joined(existing: str, addition: str, target: str) -> str:
    if not existing.strip():
        return addition
    gap = "\n\n\n" if target.endswith(".py") and addition.startswith("def ") else "\n"
    return existing.rstrip("\n") + gap + addition


def answer(body: dict[str, Any]) -> Reply:
    """The demo's reply to one chat-completions request: stateless, read off the conversation."""
    if not body.get("tools"):  # OpenCode's request for a session title
        return Reply(text=TITLE, chunks=1)
    messages = body.get("messages") or []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return Reply(text=f"{LABEL} There is no request to work on. {DISCLAIMER}")
    steps = _steps(messages[last_user + 1 :])
    todo = plan(_text(messages[last_user].get("content")))
    if not steps:
        return Reply(text=f"{LABEL} Looking for {todo.target}.\n\n", tools=[glob(todo.target)])
    name, result = steps[-1]
    if name == "glob":
        root = re.search(r"Working directory: (.+)", _text(messages[0].get("content")) if messages else "")
        wanted = f"{root.group(1).strip()}/{todo.target}" if root else None
        found = [line.strip() for line in result.splitlines()]
        if any(line == wanted or (wanted is None and line.endswith("/" + todo.target)) for line in found):
            return Reply(text=f"{LABEL} Reading {todo.target}.\n\n", tools=[read(todo.target)])
        return Reply(text=f"{LABEL} Writing {todo.target}.\n\n", tools=[write(todo.target, todo.addition)])
    if name == "read":
        existing = "" if result.startswith("File not found") else _file_content(result)
        if existing is None:
            return Reply(text=f"{LABEL} {todo.target} is too long for the demo model to rewrite; "
                              f"nothing changed. {DISCLAIMER}")
        content = _joined(existing, todo.addition, todo.target)
        return Reply(text=f"{LABEL} Writing {todo.target}.\n\n", tools=[write(todo.target, content)])
    if name == "write" and "success" in result.lower():
        return Reply(text=f"{LABEL} {todo.summary} {DISCLAIMER}", chunks=6)
    first = (result.strip().splitlines() or ["no answer"])[0][:200]
    return Reply(text=f"{LABEL} The {name} step did not go through ({first}); nothing more to do. "
                      f"{DISCLAIMER}")


def _steps(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(tool name, its result) of every tool call after the request, in order."""
    results = {m.get("tool_call_id"): _text(m.get("content")) for m in messages if m.get("role") == "tool"}
    steps = []
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            steps.append((str(function.get("name")), results.get(call.get("id"), "")))
    return steps


class DemoModelServer(ChatCompletionsServer):
    model_ids = (DEMO_MODEL,)

    def answer(self, body: dict[str, Any]) -> Reply:
        return answer(body)


class DemoModel:
    """The demo model of one Jupyter server: started when a session first uses it, stopped with
    the server. Its key is random and known only to this process (the model gateway sends it)."""

    def __init__(self) -> None:
        self._server: DemoModelServer | None = None
        self._lock = threading.Lock()

    def upstream(self) -> Upstream:
        with self._lock:
            if self._server is None:
                self._server = DemoModelServer(key=secrets.token_urlsafe(32)).start()
                log.info("tabbi: the demo model serves on %s (canned answers, not a real model)",
                         self._server.url)
            return Upstream("openai-compatible", self._server.url, self._server.key)

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.stop()
                self._server = None

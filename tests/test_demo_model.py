"""tabbi's demo model (``TABBI_MODEL=demo``): someone without an API key tries the whole flow.

Through the real server and real OpenCode it must make a real edit with OpenCode's tools (the
diff shows it), label every reply as a demo, and be reached only through the model gateway like
any other model: the key that unlocks it lives in the server, never in the sandbox.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tabbi_extension import demo_model
from tabbi_extension.chat_completions import glob, read, write

pytestmark = pytest.mark.timeout(300)

WORKDIR = "/w"
SYSTEM = {"role": "system", "content": f"<env>\n  Working directory: {WORKDIR}\n</env>"}


def conversation(prompt: str, *steps: tuple[tuple[str, dict], str]) -> dict:
    """A chat-completions request as OpenCode sends it: the request, then each tool call of the
    turn so far with its result."""
    messages = [SYSTEM, {"role": "user", "content": prompt}]
    for n, ((name, args), result) in enumerate(steps):
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": f"c{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{n}", "content": result})
    return {"model": "demo", "messages": messages, "tools": [{"type": "function"}]}


def test_the_recipe_finds_reads_writes_then_says_it_is_a_demo():
    """Stateless and deterministic: each step follows from the conversation alone."""
    prompt = "Add a function mul(a, b) in calc.py that multiplies"
    first = demo_model.answer(conversation(prompt))
    assert first.tools == [glob("calc.py")]
    found = demo_model.answer(conversation(prompt, (glob("calc.py"), f"{WORKDIR}/calc.py")))
    assert found.tools == [read("calc.py")]
    listing = "<content>\n1: def add(a, b):\n2:     return a + b\n\n(End of file - total 2 lines)\n</content>"
    written = demo_model.answer(conversation(prompt, (glob("calc.py"), f"{WORKDIR}/calc.py"),
                                             (read("calc.py"), listing)))
    ((name, args),) = written.tools
    assert name == "write" and args["filePath"] == "calc.py"
    assert args["content"].startswith("def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n")
    assert "NotImplementedError" in args["content"]
    done = demo_model.answer(conversation(prompt, (glob("calc.py"), f"{WORKDIR}/calc.py"),
                                          (read("calc.py"), listing),
                                          (written.tools[0], "Wrote file successfully.")))
    assert not done.tools and "Added a stub of `mul(a, b)` to calc.py" in done.text
    # A file of the same name elsewhere in the tree is not the one asked for: write a new one.
    elsewhere = demo_model.answer(conversation(prompt, (glob("calc.py"), f"{WORKDIR}/lib/calc.py")))
    assert elsewhere.tools[0][0] == "write"
    # Every reply says it is the demo; the same conversation gets the same reply.
    assert all(r.text.startswith(demo_model.LABEL) for r in (first, found, written, done))
    assert demo_model.answer(conversation(prompt)) == first
    # A failed step ends the turn saying so, without pretending it worked.
    refused = demo_model.answer(conversation(prompt, (glob("calc.py"), "No files found"),
                                             (write("calc.py", "x"), "The user rejected permission")))
    assert "did not go through" in refused.text and not refused.tools


def test_requests_without_a_file_or_outside_the_workspace_become_a_note():
    assert demo_model.plan("make it faster").target == demo_model.NOTES
    assert demo_model.plan("look at ../../etc/passwd.txt and /etc/x.py").target == demo_model.NOTES
    assert demo_model.plan("Add slugify(text) in text_utils.py").addition == demo_model.RECIPES["slugify"]
    assert demo_model.plan("explain docs/intro.md").addition.startswith("- explain docs/intro.md")


@pytest.mark.tabbi(model="demo", llm_base_url=None)
async def test_a_demo_session_edits_the_repository_through_the_gateway(api, source_repo, tabbi_app,
                                                                       workspace):
    """The whole flow with no key: start, a prompt, a real edit in the diff, a labelled reply.
    The demo's key never reaches the sandbox (OpenCode only has its gateway token), and the
    demo answers nobody who does not hold that key."""
    session = await api.create(str(source_repo))
    sid = session["id"]
    await api.wait_state(sid, "running")
    await api.prompt(sid, "Add a function mul(a, b) in calc.py that multiplies two numbers.")
    events = await api.wait_turn(sid, timeout=120)
    assert events[-1]["data"]["outcome"] == "completed", events[-1]

    tools = [e["data"]["tool"] for e in events if e["type"] == "tool" and e["data"]["status"] == "completed"]
    assert tools == ["glob", "read", "write"]
    text = "".join(e["data"]["delta"] for e in events if e["type"] == "text.delta")
    assert text.count(demo_model.LABEL) == 4 and "Added a stub of `mul(a, b)` to calc.py" in text
    diff = await api.ok("GET", f"tabbi/api/sessions/{sid}/diff")
    assert [f["path"] for f in diff["files"]] == ["calc.py"]
    assert "+def mul(a, b):" in diff["diff"] and "-def add" not in diff["diff"]

    upstream = tabbi_app.demo_model.upstream()
    assert tabbi_app.gateway.usage[sid].requests >= 4  # three steps and a title, all through it
    sandbox_files = b"".join(p.read_bytes() for p in workspace(sid).parent.rglob("*")
                             if p.is_file() and not p.is_symlink() and p.stat().st_size < 10_000_000)
    assert upstream.key.encode() not in sandbox_files
    request = urllib.request.Request(f"{upstream.base_url}/chat/completions", method="POST",
                                     data=b'{"model": "demo", "messages": []}')
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401

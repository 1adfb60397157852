"""The kernel side through real kernels: the magics, the Python API and the panel's synced state,
against the real server and real OpenCode (scripted model)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import git
from tests.support.llm import Reply, edit, read, write

pytestmark = pytest.mark.timeout(300)


async def start(kernel, repo) -> str:
    done = await kernel.run(f"%load_ext tabbi_kernel\n%tabbi start {repo}")
    assert done.status == "ok", done
    assert "[tabbi] cloning" in done.stdout and "[tabbi] ready" in done.stdout, done.stdout
    return done.stdout.split("[tabbi] session ")[1].split()[0]


async def test_start_ask_diff_insert_through_the_magics(kernel, llm, source_repo, api):
    sid = await start(kernel, source_repo)
    status = await kernel.run("%tabbi status")
    assert f"{sid}: running" in status.stdout

    llm.enqueue(
        Reply(text="Let me add a greeting.", tools=[write("greet.py", "def greet(name):\n"
                                                            "    return f'hello {name}'\n")]),
        Reply(text="Done. Try it:\n\n```python\nprint(greet('notebook'))\n```\n"),
    )
    turn = await kernel.run("%%tabbi\nadd a greet function in greet.py")
    assert turn.status == "ok" and not turn.stderr, turn
    assert "Let me add a greeting." in turn.stdout
    assert "[tool] write greet.py: completed" in turn.stdout
    assert "Done. Try it:" in turn.stdout

    diff = await kernel.run("%tabbi diff")
    html = diff.displays[0]["text/html"]
    plain = diff.displays[0]["text/plain"]
    assert "greet.py (+2 -0)" in plain and "+def greet(name):" in plain
    assert "color:#1a7f37" in html and "def greet(name):" in html

    inserted = await kernel.run("%tabbi insert")
    assert "inserted 2 snippet(s)" in inserted.stdout
    assert inserted.next_input() == (
        "# %% [tabbi] from greet.py (written by the agent)\n"
        "def greet(name):\n    return f'hello {name}'\n\n"
        "# %% [tabbi] from a code block in the agent's reply\n"
        "print(greet('notebook'))\n"
    )
    table = await kernel.run("%tabbi sessions")
    assert sid in table.displays[0]["text/plain"] and "running" in table.displays[0]["text/plain"]


async def test_insert_takes_edited_files_at_their_final_content(kernel, llm, source_repo):
    await start(kernel, source_repo)
    llm.enqueue(Reply(tools=[read("calc.py")]),
                Reply(tools=[edit("calc.py", "return a + b", "return a + b  # checked")]),
                Reply(text="edited"))
    await kernel.run("%tabbi ask annotate add")
    inserted = await kernel.run("%tabbi insert")
    assert inserted.next_input() == ("# %% [tabbi] from calc.py (edited by the agent)\n"
                                     "def add(a, b):\n    return a + b  # checked\n")


async def test_interrupting_the_kernel_aborts_the_turn(kernel, llm, source_repo, api):
    sid = await start(kernel, source_repo)
    llm.enqueue(Reply(text="tick " * 300, chunks=150, drip=0.1), Reply(text="after"))
    streaming = asyncio.Event()
    cell = asyncio.ensure_future(kernel.run(
        "%%tabbi\ntalk slowly", on_output=lambda r: "tick" in r.stdout and streaming.set()))
    await asyncio.wait_for(streaming.wait(), 120)
    await kernel.manager.interrupt_kernel(kernel.id)
    done = await cell
    assert done.status == "ok", done  # the abort is handled: no KeyboardInterrupt traceback
    assert "[tabbi] the turn was aborted" in done.stdout
    events = (await api.events(sid))["events"]
    finished = [e for e in events if e["type"] == "turn.finished"]
    assert finished[-1]["data"]["outcome"] == "aborted"
    after = await kernel.run("%tabbi ask are you there")
    assert "after" in after.stdout


async def test_errors_are_readable_without_tracebacks(kernel, llm, source_repo):
    await kernel.run("%load_ext tabbi_kernel")
    for code, message in [
        ("%tabbi start /no/such/repo", "as a local path must be a git repository inside your Jupyter root"),
        ("%tabbi nonsense", "unknown command 'nonsense'"),
        ("%tabbi status", "no current session"),
        ("%tabbi use ses-000000000000", "no session ses-000000000000"),
        ("%tabbi start", "the following arguments are required: repo"),
        ("%tabbi login", "GitHub sign-in is not configured on this server"),
        ("%tabbi push --to x.py", "--to and --cells-only go with --cells"),
    ]:
        done = await kernel.run(code)
        # One red line (IPython's UsageError): the message, no traceback of tabbi's internals.
        assert done.status == "error", (code, done)
        assert done.stderr.startswith("UsageError: ") and message in done.stderr, (code, done.stderr)
        assert "Traceback" not in done.text and "tabbi_kernel" not in done.text
    helped = await kernel.run("%tabbi --help")
    for command in ("start REPO", "%%tabbi", "diff", "insert", "panel", "abort", "delete", "push", "login"):
        assert command in helped.stdout


async def test_python_api_mirrors_the_magics(kernel, llm, source_repo):
    llm.enqueue(Reply(text="api answer", tools=[write("api.py", "X = 1\n")]), Reply(text="ok"))
    done = await kernel.run(
        "import tabbi_kernel\n"
        "client = tabbi_kernel.connect()\n"
        f"session = client.start({str(source_repo)!r})\n"
        "session.wait_until_running()\n"
        "result = session.ask('make api.py')\n"
        "print(result.outcome, [t['tool'] for t in result.tools], repr(result.text))\n"
        "print(sorted(f['path'] for f in session.diff()['files']))\n"
        "print(session.read_file('api.py'), end='')\n"
        "seqs = [e['seq'] for e in session.all_events()]\n"
        "print(seqs == list(range(1, len(seqs) + 1)))\n"
    )
    assert done.status == "ok", done
    lines = done.stdout.splitlines()
    assert lines[0] == "completed ['write'] 'api answerok'"
    assert lines[1] == "['api.py']"
    assert lines[2] == "X = 1"
    assert lines[3] == "True"


@pytest.mark.tabbi(permissions={"edit": "ask", "bash": "allow"})
async def test_panel_answers_a_permission_request_through_the_server(kernel, llm, source_repo, api):
    sid = await start(kernel, source_repo)
    shown = await kernel.run("%tabbi panel")
    model_id = shown.displays[0]["application/vnd.jupyter.widget-view+json"]["model_id"]
    llm.enqueue(Reply(tools=[write("perm.py", "P = 1\n")]), Reply(text="written after approval"))
    queued = await kernel.run("%%tabbi --no-wait\nwrite perm.py")
    assert "queued" in queued.stdout  # returned at once; the turn goes on in the panel
    await kernel.drain_comms(lambda: bool(kernel.widget_state(model_id).get("permissions")), timeout=120)
    request = kernel.widget_state(model_id)["permissions"][0]
    assert request["permission"] == "edit" and "perm.py" in request["metadata"]["diff"]

    # What the panel's "Allow once" button sends, through the real widget comm.
    kernel.client.session.send(kernel.client.shell_channel.socket, "comm_msg", {
        "comm_id": model_id,
        "data": {"method": "custom", "content": {"type": "permission",
                                                 "id": request["permission_id"], "reply": "once"}},
    })
    events = await api.wait_turn(sid)
    assert any(e["type"] == "permission.replied" and e["data"]["reply"] == "once" for e in events)
    assert events[-1]["data"]["outcome"] == "completed"
    await kernel.drain_comms(lambda: kernel.widget_state(model_id).get("permissions") == [], timeout=60)


async def test_pause_and_resume_from_the_magics(kernel, llm, source_repo):
    sid = await start(kernel, source_repo)
    await kernel.run("%tabbi ask hello")
    paused = await kernel.run("%tabbi pause")
    assert paused.status == "ok", paused
    assert f"{sid} is paused" in paused.stdout
    assert f"{sid}: paused" in (await kernel.run("%tabbi status")).stdout
    resumed = await kernel.run("%tabbi resume")
    assert resumed.status == "ok", resumed
    assert "restoring the last snapshot" in resumed.stdout and "running again" in resumed.stdout


async def test_panel_shows_a_failed_turn_and_pushes_from_its_button(kernel, llm, source_repo, api):
    sid = await start(kernel, source_repo)
    shown = await kernel.run("%tabbi panel")
    model_id = shown.displays[0]["application/vnd.jupyter.widget-view+json"]["model_id"]
    llm.enqueue(*[Reply(status=500)] * 4)
    await api.prompt(sid, "this fails")
    await kernel.drain_comms(lambda: "gave up" in kernel.widget_state(model_id).get("turn_error", ""),
                             timeout=120)

    llm.script.clear()
    llm.enqueue(Reply(tools=[write("panel.txt", "from the panel\n")]), Reply(text="written"))
    queued = await api.prompt(sid, "write panel.txt")
    events = await api.wait_for(sid, lambda e: e["type"] == "turn.finished"
                                and e["data"]["prompt_id"] == queued["prompt_id"])
    assert events[-1]["data"]["outcome"] == "completed"
    await kernel.drain_comms(lambda: kernel.widget_state(model_id).get("turn_error") == "", timeout=120)
    # What the panel's "Commit and push" button sends, through the real widget comm.
    kernel.client.session.send(kernel.client.shell_channel.socket, "comm_msg", {
        "comm_id": model_id,
        "data": {"method": "custom", "content": {"type": "push", "message": "From the panel", "pr": False}},
    })
    await kernel.drain_comms(lambda: bool(kernel.widget_state(model_id).get("pushed", {}).get("commit")),
                             timeout=120)
    state = kernel.widget_state(model_id)
    branch = state["pushed"]["branch"]
    assert git("log", "-1", "--format=%s", branch, cwd=source_repo) == "From the panel"
    assert state["pushed"]["commit"] == git("rev-parse", branch, cwd=source_repo)
    await kernel.drain_comms(lambda: kernel.widget_state(model_id)["pushed"].get("committed"), timeout=60)

"""Context from a real kernel to the model, end to end: real server, real OpenCode, real kernel with
pandas, the scripted model asserting on what it received. One session carries the whole story
(attach, refuse, fix, replay) so the module costs one sandbox start."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.support.llm import Reply, edit

pytestmark = pytest.mark.timeout(300)

#: In the kernel's namespace, never attached: it must never reach the model.
MARKER = "MARKER-NOT-ATTACHED-5e1d"


def seen_by_model(llm) -> str:
    return json.dumps(llm.agent_requests(), ensure_ascii=False)


async def test_attached_context_reaches_the_model_and_nothing_else(kernel, llm, source_repo, api, data_dir):
    started = await kernel.run(f"%load_ext tabbi_kernel\n%tabbi start {source_repo}")
    assert "[tabbi] ready" in started.stdout, started
    sid = started.stdout.split("[tabbi] session ")[1].split()[0]
    await kernel.run(f"hidden_note = {MARKER!r}")  # a cell never attached
    await kernel.run(
        "import os, tempfile, pandas as pd\n"
        "os.chdir(tempfile.mkdtemp())  # @file: reads the kernel's working directory: a scratch one\n"
        "df_sales = pd.DataFrame({'region': ['north', 'south'], 'units_sold': [3, 4]})\n"
        "open('notes.txt', 'w').write('the fiscal year starts in April\\n')")
    await kernel.run("units_per_region = df_sales.groupby('region')['units_sold'].sum()")
    where = await kernel.run("print([n for n, s in enumerate(In) if s.startswith('units_per_region =')])")
    [cell_number] = json.loads(where.stdout)
    failing = await kernel.run("revenue = df_sales['price'] * df_sales['units_sold']")
    assert failing.error and failing.error["ename"] == "KeyError"

    # 1. --with: what goes is listed before it is sent, and it reaches the model.
    llm.enqueue(Reply(text="Schema received."))
    turn = await kernel.run(f"%%tabbi --with df_sales,@cell:{cell_number},@error,@file:notes.txt\n"
                            "what do you see?")
    assert turn.status == "ok" and not turn.stderr, turn
    shown = turn.stdout.split("\n")[0]
    assert shown.startswith("[tabbi] attached: df_sales (variable, ") and "@error (error, " in shown
    assert f"@cell:{cell_number} (cells, " in shown and "@file:notes.txt (file, " in shown
    assert turn.stdout.index("[tabbi] attached") < turn.stdout.index("Schema received.")
    model = seen_by_model(llm)
    for sent in ("2 rows x 2 columns", "units_sold: int64", "KeyError: 'price'",
                 "revenue = df_sales['price'] * df_sales['units_sold']",  # the failing cell
                 "units_per_region = df_sales.groupby",  # @cell:N's source
                 "the fiscal year starts in April", '<attachment kind=\\"variable\\" label=\\"df_sales\\"'):
        assert sent in model, sent
    assert MARKER not in model

    # 2. The log records what was attached (not the content); the user's message shows only
    #    their words; the store keeps the content with the prompt until delivered.
    events = (await api.events(sid))["events"]
    [started_turn] = [e for e in events if e["type"] == "turn.started"]
    labels = [(a["label"], a["kind"]) for a in started_turn["data"]["attachments"]]
    assert labels == [("df_sales", "variable"), (f"@cell:{cell_number}", "cells"), ("@error", "error"),
                      ("@file:notes.txt", "file")]
    assert all(a["bytes"] > 0 and a["truncated"] is False for a in started_turn["data"]["attachments"])
    assert "units_sold: int64" not in json.dumps(events)
    user_text = [e["data"]["text"] for e in events
                 if e["type"] == "part.updated" and e["data"]["role"] == "user"]
    assert user_text and all("<attachment" not in t for t in user_text), user_text
    with sqlite3.connect(next(data_dir.glob("*.sqlite3"))) as db:
        [(stored,)] = db.execute("SELECT attachments FROM prompts WHERE session_id=?", (sid,)).fetchall()
    assert [a["label"] for a in json.loads(stored)] == ["df_sales", f"@cell:{cell_number}", "@error",
                                                       "@file:notes.txt"]

    # 3. Asking for what does not exist sends nothing.
    before = len(llm.agent_requests())
    refused = await kernel.run("%%tabbi --with df_sales,no_such_frame\nlook")
    assert refused.status == "error" and "no variable 'no_such_frame'" in refused.stderr
    assert "nothing was sent" in refused.stderr
    assert len([e for e in (await api.events(sid))["events"] if e["type"] == "prompt.queued"]) == 1
    assert len(llm.agent_requests()) == before

    # 4. The edge refuses malformed attachments with a reason (the threat: a client that skips the
    #    kernel's limits and bloats the store or the model's context).
    good = {"kind": "variable", "label": "x", "content": "x", "truncated": False}
    for attachments, reason in [([{**good, "kind": "secrets"}], "'kind' must be one of"),
                                ([{**good, "content": "x" * 70_000}], "limit per attachment"),
                                ([good] * 21, "at most 20"), ("nope", "must be a list")]:
        code, body = await api.call("POST", f"tabbi/api/sessions/{sid}/prompt",
                                    {"text": "t", "attachments": attachments})
        assert code == 400 and reason in body["message"], (code, body)

    # 5. The fix loop: the last error, its cell and the variables it names go; the agent edits
    #    the repository's code; the turn streams into the cell.
    llm.enqueue(Reply(tools=[edit("calc.py", "return a + b", "return a + b  # fixed")]),
                Reply(text="Fixed in calc.py."))
    fixed = await kernel.run("%tabbi fix the price column is called unit_price")
    assert fixed.status == "ok" and not fixed.stderr, fixed
    assert fixed.stdout.startswith("[tabbi] attached: @error (error, ")
    assert "df_sales (variable, " in fixed.stdout.split("\n")[0]
    assert "[tool] edit calc.py: completed" in fixed.stdout and "Fixed in calc.py." in fixed.stdout
    fix_request = json.dumps(llm.agent_requests()[before:], ensure_ascii=False)
    assert "fix it there (not in the notebook" in fix_request and "unit_price" in fix_request
    assert "KeyError: 'price'" in fix_request and "units_sold: int64" in fix_request
    assert MARKER not in fix_request

    # 6. Replayed from the server (a reload), the history shows what went with each prompt.
    replay = await kernel.run(
        "import tabbi_kernel\nfrom tabbi_kernel.conversation import Conversation, transcript_text\n"
        f"s = tabbi_kernel.connect().session({sid!r})\n"
        "print(transcript_text(Conversation().apply_all(s.all_events()), 'history'))")
    assert "attached: df_sales (variable, " in replay.stdout, replay.stdout
    assert replay.stdout.count("attached: ") == 2 and "@error (error, " in replay.stdout

"""10 sessions x 5 turns at once on this 2-core machine, against one real server process: no
event lost or duplicated, no session stuck. The figures it prints go into docs/benchmarks.md
(bench/bench_load.py runs the same code)."""

from __future__ import annotations

import pytest

from tests.support.load import run_load
from tests.support.server import JupyterProcess

pytestmark = pytest.mark.timeout(600)


def test_ten_sessions_five_turns_at_once(tmp_path, llm, source_repo):
    server = JupyterProcess(llm.url, tmp_path / "srv", extra=["--TabbiExtension.idle_timeout=0"])
    try:
        result = run_load(server, source_repo, sessions=10, turns=5)
    finally:
        server.stop()
    print(result.summary())
    assert len(result.events) == 10
    for sid, events in result.events.items():
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), sid
        started = [e["data"]["prompt_id"] for e in events if e["type"] == "turn.started"]
        finished = [e["data"] for e in events if e["type"] == "turn.finished"]
        assert len(started) == len(set(started)) == 5, sid
        assert [f["prompt_id"] for f in finished] == started, sid
        assert {f["outcome"] for f in finished} == {"completed"}, (sid, finished)
        assert not [e for e in events if e["type"] == "error"], sid

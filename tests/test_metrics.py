"""tabbi's Prometheus metrics, scraped from the real ``/metrics`` of a real Jupyter server process.

One server, one scripted model and two sessions serve the whole module: the journey runs once
(``journey``), and each test reads what it needs from the scrapes taken before and after it.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tabbi_extension import metrics
from tabbi_extension.states import TRANSITIONS
from tests.conftest import git
from tests.support.llm import Reply, ScriptedLLM, write
from tests.support.server import JupyterProcess

pytestmark = pytest.mark.timeout(300)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: JupyterProcess) -> tuple[Samples, str]:
    request = urllib.request.Request(server.url + "metrics",
                                     headers={"Authorization": f"token {server.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, text


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def tabbi_labels(samples: Samples) -> list[tuple[str, str, str]]:
    """(metric, label, value) of every label of every tabbi sample."""
    return [(name, k, v) for (name, labels), _ in samples.items() if name.startswith("tabbi_")
            for k, v in labels]


def wait_for(server: JupyterProcess, sid: str, kind: str, **data: str) -> None:
    server.wait_event(sid, lambda e: e["type"] == kind
                      and all(e["data"].get(k) == v for k, v in data.items()))


class Journey:
    def __init__(self, server: JupyterProcess, llm: ScriptedLLM, repo: Path, marker: str):
        self.server, self.repo, self.marker = server, repo, marker
        self.before, _ = scrape(server)
        self.sessions: list[dict] = []
        started = time.monotonic()
        # Two sessions at once, each one turn: the first writes a file, the second answers text.
        llm.enqueue(Reply(text=f"Writing it. {marker}-output",
                                 tools=[write("notes.py", "X = 1\n")]), Reply(text="Done."))
        for _ in range(2):
            self.sessions.append(server.call("POST", "tabbi/api/sessions", {"repo": str(repo)}))
        for session in self.sessions:
            wait_for(server, session["id"], "session.status", state="running")
        for session in self.sessions:
            server.call("POST", f"tabbi/api/sessions/{session['id']}/prompt",
                        {"text": f"please add notes {marker}-prompt"})
        for session in self.sessions:
            wait_for(server, session["id"], "turn.finished", outcome="completed")
            wait_for(server, session["id"], "snapshot.saved", reason="turn")
        self.seconds = time.monotonic() - started
        self.after, self.text = scrape(server)


@pytest.fixture(scope="module")
def journey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journey]:
    marker = "mkr" + secrets.token_hex(6)
    root = tmp_path_factory.mktemp("metrics")
    repo = root / f"repo-{marker}"
    repo.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=repo)
    (repo / "README.md").write_text("# sample\n")
    git("add", ".", cwd=repo)
    git("commit", "--quiet", "-m", "initial", cwd=repo)
    llm = ScriptedLLM().start()
    server = JupyterProcess(llm.url, root / "jupyter")
    try:
        yield Journey(server, llm, repo, marker)
    finally:
        server.stop()
        llm.stop()


def test_metrics_need_jupyters_authentication(journey: Journey):
    """Jupyter serves /metrics; with authenticate_prometheus (its default) only to its users."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(journey.server.url + "metrics", timeout=30)
    assert refused.value.code == 403
    assert "# TYPE tabbi_turn_seconds histogram" in journey.text


def test_metrics_appear_and_move_after_turns(journey: Journey):
    before, after = journey.before, journey.after
    # Gauges, read at scrape time: nothing before, two running sandboxes after.
    assert {s: value(before, "tabbi_sessions", state=s) for s in TRANSITIONS} == dict.fromkeys(TRANSITIONS, 0)
    assert value(after, "tabbi_sessions", state="running") == 2
    assert value(after, "tabbi_sandboxes_running", provider="local") == 2
    assert value(after, "tabbi_turns_running") == 0
    assert 0 < value(after, "tabbi_sandbox_longest_idle_seconds") < journey.seconds + 5

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("tabbi_sandbox_start_seconds_count", provider="local", outcome="ready") == 2
    assert grew("tabbi_sandbox_start_seconds_sum", provider="local", outcome="ready") > 0.5
    assert grew("tabbi_turn_seconds_count", outcome="completed") == 2
    assert 0 < grew("tabbi_turn_seconds_sum", outcome="completed") < 2 * journey.seconds  # they overlap
    assert grew("tabbi_snapshot_seconds_count", outcome="saved") >= 2
    assert grew("tabbi_snapshot_bytes_count") >= 2 and grew("tabbi_snapshot_bytes_sum") > 1000
    # Every text delta the model streamed was timed from its arrival to its subscribers.
    assert grew("tabbi_delta_latency_seconds_count") >= 2
    assert grew("tabbi_events_written_total") >= 20
    # The scripted model reports 10 prompt and 5 completion tokens per call; OpenCode passes them on.
    models = {dict(labels)["model"] for name, labels in after if name == "tabbi_model_tokens_total"}
    assert len(models) == 1, models
    model = models.pop()
    assert grew("tabbi_model_tokens_total", model=model, kind="input") >= 20
    assert grew("tabbi_model_tokens_total", model=model, kind="output") >= 10
    assert grew("tabbi_store_errors_total", backend="sqlite", kind="unavailable") == 0


def test_labels_are_bounded_and_name_no_session_repo_owner_or_prompt(journey: Journey):
    """Threat: a label value per session, repository or prompt (an unbounded number of series
    that floods Prometheus, and a scrape that tells whoever reads it what people work on)."""
    labels = tabbi_labels(journey.after)
    assert labels  # the check below sees the labels it is about
    allowed = {
        "state": set(TRANSITIONS), "provider": {"local"}, "le": None, "by": {"session", "store"},
        "outcome": {"ready", "failed", "restore_failed", "completed", "aborted", "error", "saved",
                    "pushed", "rejected", "refused"},
        "backend": {"sqlite", "convex"},
        "kind": {"input", "output", "reasoning", "cache_read", "cache_write", "unavailable", "permanent"},
        "model": None,
    }
    forbidden = [journey.marker, str(journey.repo)]
    for session in journey.sessions:
        forbidden += [session["id"], session["id"].removeprefix("ses-"), session["owner"]]
    for metric, label, text in labels:
        assert label in allowed, (metric, label)
        if allowed[label] is not None:
            assert text in allowed[label], (metric, label, text)
        assert not any(word in text for word in forbidden), (metric, label, text)
    # Model names come from what OpenCode reports: capped, whatever people ask for.
    assert {text for _, label, text in labels if label == "model"} <= {"tabbi/scripted"}


def test_model_usage_counts_increments_and_caps_model_names():
    """OpenCode repeats a message's running totals; only increases count. A person asking for
    ever new model names gets at most ``MAX_MODELS`` label values, then ``other``."""
    names = metrics._ModelNames(limit=2)
    assert [names.label("p", f"m{i}") for i in range(4)] == ["p/m0", "p/m1", "other", "other"]
    assert names.label("p", "m0") == "p/m0" and names.label("p", "a b\n") == "other"

    counter = metrics.UsageCounter()
    model = f"unit/{secrets.token_hex(4)}"
    provider, model_id = model.split("/")

    def tokens() -> tuple[float, float]:
        return (metrics.MODEL_TOKENS.labels(model, "input")._value.get(),
                metrics.MODEL_COST.labels(model)._value.get())

    info = {"providerID": provider, "modelID": model_id, "cost": 0.5,
            "tokens": {"input": 100, "output": 10, "cache": {"read": 3, "write": 0}}}
    counter.add("msg_1", info)
    counter.add("msg_1", info)  # the same totals again: nothing new
    assert tokens() == (100, 0.5)
    counter.add("msg_1", {**info, "cost": 0.75, "tokens": {"input": 150}})
    counter.add("msg_2", {**info, "cost": float("nan"), "tokens": {"input": -5}})  # nonsense: ignored
    assert tokens() == (150, 0.75)

"""tabbi's Prometheus metrics, all defined here, served by Jupyter's own ``/metrics``.

Jupyter server already exposes ``prometheus_client``'s default registry at ``<base_url>metrics``
(authenticated unless ``c.ServerApp.authenticate_prometheus = False``); in hub mode that is
``/services/tabbi/metrics``, with a hub token carrying the service's access scope. So tabbi
registers its metrics in that registry and adds no route of its own.

The code that does the work calls one-line hooks (``TURN_SECONDS.labels(...).observe(...)``,
``store_error(...)``); the gauges are read at scrape time from the session managers of this
process (``watch``), so they cannot drift from the truth.

**Labels are bounded.** No label carries a session id, an owner, a repository, a prompt, a path
or a secret: only ``state``, ``provider``, ``outcome``, ``backend``, ``kind`` and ``model``, each
from a small fixed set. Model names come from OpenCode's reports and a person may ask for any
model, so ``model`` is capped: the first ``MAX_MODELS`` distinct well-formed names that
reported usage keep their name, every later one is counted as ``other``.
"""

from __future__ import annotations

import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import states

if TYPE_CHECKING:
    from .manager import SessionManager

#: Distinct model names a ``model`` label may take before later ones count as ``other``.
MAX_MODELS = 20
OTHER = "other"
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,99}$")
#: Assistant messages whose reported usage is remembered per session (to count increments).
_MESSAGES_REMEMBERED = 64

_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

SANDBOX_START_SECONDS = Histogram(
    "tabbi_sandbox_start_seconds",
    "Seconds from a session's start (or resume) to its agent being ready, by sandbox provider "
    "and outcome (ready, failed, restore_failed).",
    ["provider", "outcome"],
    buckets=(0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 90, 120, 300),
)
TURN_SECONDS = Histogram(
    "tabbi_turn_seconds",
    "Seconds from a turn's start to its end, by outcome (completed, aborted, error); its "
    "_count is the number of turns.",
    ["outcome"],
    buckets=_SECONDS,
)
DELTA_LATENCY_SECONDS = Histogram(
    "tabbi_delta_latency_seconds",
    "Seconds from a streamed text delta received from the agent to its event being stored and "
    "handed to the session's subscribers (what tabbi adds to the model's stream).",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
EVENTS_WRITTEN = Counter("tabbi_events_written", "Events stored in session logs.")
STORE_RETRIES = Counter(
    "tabbi_store_retries",
    "Store calls retried because the store could not answer (busy, locked, unreachable): by "
    "the store itself (Convex's HTTP calls) or by the session core (a call the store gave up on).",
    ["by"],
)
STORE_ERRORS = Counter(
    "tabbi_store_errors",
    "Store errors raised, by backend and kind (unavailable: worth a retry; permanent).",
    ["backend", "kind"],
)
SNAPSHOT_SECONDS = Histogram(
    "tabbi_snapshot_seconds",
    "Seconds a snapshot took, by outcome (saved, failed).",
    ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
SNAPSHOT_BYTES = Histogram(
    "tabbi_snapshot_bytes",
    "Size of saved snapshots in bytes.",
    buckets=tuple(float(4**n * 1024) for n in range(1, 13)),  # 4 kB .. 16 GB
)
PUSHES = Counter(
    "tabbi_pushes", "Pushes of session work, by outcome (pushed, rejected, failed).", ["outcome"]
)
MODEL_TOKENS = Counter(
    "tabbi_model_tokens",
    "Model tokens as OpenCode reports them, by model and kind (input, output, reasoning, "
    "cache_read, cache_write).",
    ["model", "kind"],
)
MODEL_COST = Counter(
    "tabbi_model_cost_dollars",
    "Model cost in US dollars as OpenCode reports it (0 for models it has no price for), by model.",
    ["model"],
)


def backend_name(store: object) -> str:
    """The ``backend`` label of a store: its class name without ``Store`` (``sqlite``, ``convex``)."""
    return type(store).__name__.removesuffix("Store").lower() or "store"


def store_error(backend: str, exc: BaseException) -> None:
    """Count a store error about to be raised (``StoreUnavailable`` or a permanent one)."""
    from .store import StoreUnavailable  # here: the store package imports this module

    STORE_ERRORS.labels(backend, "unavailable" if isinstance(exc, StoreUnavailable) else "permanent").inc()


class _ModelNames:
    """The bounded set of ``model`` label values (see the module docstring)."""

    def __init__(self, limit: int = MAX_MODELS):
        self.limit = limit
        self.known: set[str] = set()

    def label(self, provider: Any, model: Any) -> str:
        name = f"{provider}/{model}" if provider and model else str(model or "")
        if not _MODEL_NAME.match(name):
            return OTHER
        if name not in self.known:
            if len(self.known) >= self.limit:
                return OTHER
            self.known.add(name)
        return name


MODEL_NAMES = _ModelNames()

_TOKEN_KINDS = (("input", ("input",)), ("output", ("output",)), ("reasoning", ("reasoning",)),
                ("cache_read", ("cache", "read")), ("cache_write", ("cache", "write")))


class UsageCounter:
    """Counts one session's model usage from OpenCode's assistant message infos. OpenCode reports
    a message's running totals each time it updates it, so what is counted is the increase over
    what this counter saw of the same message (a server restarted mid-message counts that
    message's totals again: counters restart with the process anyway)."""

    def __init__(self) -> None:
        self._seen: OrderedDict[str, tuple[float, ...]] = OrderedDict()

    def add(self, message_id: str, info: dict[str, Any]) -> None:
        tokens = info.get("tokens") if isinstance(info.get("tokens"), dict) else {}
        values = [_number(_dig(tokens, path)) for _, path in _TOKEN_KINDS]
        values.append(_number(info.get("cost")))
        now = tuple(values)
        before = self._seen.pop(message_id, (0.0,) * len(now))
        self._seen[message_id] = tuple(max(a, b) for a, b in zip(now, before, strict=True))
        while len(self._seen) > _MESSAGES_REMEMBERED:
            self._seen.popitem(last=False)
        increase = [max(0.0, a - b) for a, b in zip(now, before, strict=True)]
        if not any(increase):
            return
        model = MODEL_NAMES.label(info.get("providerID"), info.get("modelID"))
        for (kind, _), amount in zip(_TOKEN_KINDS, increase, strict=False):
            if amount:
                MODEL_TOKENS.labels(model, kind).inc(amount)
        if increase[-1]:
            MODEL_COST.labels(model).inc(increase[-1])


def _dig(value: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if value == value and value >= 0 else 0.0  # NaN and negatives: 0


# -- gauges, read at scrape time ---------------------------------------------------------------
_managers: weakref.WeakSet[SessionManager] = weakref.WeakSet()


def watch(manager: SessionManager) -> None:
    """Report ``manager``'s sessions in the gauges (every manager of this process is summed)."""
    _managers.add(manager)


class _SessionGauges(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_state = dict.fromkeys(sorted(states.TRANSITIONS), 0)
        running: dict[str, int] = {}
        turns, longest_idle = 0, 0.0
        now = time.monotonic()
        for manager in list(_managers):
            provider = getattr(manager.provider, "name", None) or "unknown"
            running.setdefault(provider, 0)
            for agent in manager.agents():
                by_state[agent.state] = by_state.get(agent.state, 0) + 1
                if agent.has_sandbox:
                    running[provider] += 1
                    if agent.busy:
                        turns += 1
                    else:
                        longest_idle = max(longest_idle, now - agent.last_activity)
        sessions = GaugeMetricFamily(
            "tabbi_sessions", "Sessions this server holds, by state (dormant sessions that no "
            "request touched since the server started are not held).", labels=["state"])
        for state, count in by_state.items():
            sessions.add_metric([state], count)
        yield sessions
        sandboxes = GaugeMetricFamily(
            "tabbi_sandboxes_running", "Sandboxes running, by provider.", labels=["provider"])
        for provider, count in sorted(running.items()):
            sandboxes.add_metric([provider], count)
        yield sandboxes
        yield GaugeMetricFamily("tabbi_turns_running", "Sessions in a turn now.", value=turns)
        yield GaugeMetricFamily(
            "tabbi_sandbox_longest_idle_seconds",
            "Seconds since the last activity of the longest-idle running sandbox not in a turn "
            "(0: none); above idle_timeout for long, something keeps sandboxes from pausing.",
            value=round(longest_idle, 3))


REGISTRY.register(_SessionGauges())

"""What hub mode costs per request: a person's kernel calling tabbi's service through the hub's
proxy (configurable-http-proxy) and the hub's token check, against personal mode (the kernel
calling tabbi inside its own Jupyter server), measured in the same run with the same scripted model.

The same code runs in a real kernel in each mode (``tabbi_kernel.client``, as the magics use it):
- a round trip: ``GET tabbi/api/health``, repeated (the per-request overhead itself);
- start: ``POST sessions`` until the session is running (a local repository; the sandbox start
  dominates, so the ratio shows how little the route adds to it);
- one turn's delta latency: from the model server writing a text delta to the kernel receiving it
  on tabbi's WebSocket;
- event replay: ``GET events?after=0`` of that session (a panel or ``%tabbi use`` catching up).

Needs root (the hub's users are OS users, as in tests/test_hub.py) and configurable-http-proxy
(npm install). Run: ``.venv/bin/python bench/bench_hub.py [ROUNDS]``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench_latency import latencies, script
from harness import JupyterProcess, ScriptedLLM, machine, sample_repo, summary
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.support.hub import Hub, HubKernel

USER, SERVICE = "benchhub", "tabbisvcbench"
REPOS = f"/home/{SERVICE}/repos"
START_TIMEOUT = 300  # a loaded machine starts sandboxes slowly; the bench measures, it does not judge

SETUP = """
import json, time
from tabbi_kernel import client
cl = client.connect()
trips = []
for _ in range({rounds}):
    t0 = time.perf_counter(); cl.health(); trips.append(time.perf_counter() - t0)
t0 = time.perf_counter()
s = cl.start({repo!r})
s.wait_until_running()
started = time.perf_counter() - t0
s.ask("warm up")
last = s.refresh()["last_seq"]
print("RESULT", json.dumps({{"trips": trips, "start": started, "sid": s.id, "last": last}}))
"""

STREAM = """
import json, time
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect
from tabbi_kernel import client
cl = client.connect()
s = cl.session({sid!r})
ws = await websocket_connect(HTTPRequest(
    cl.url.replace("http", "ws", 1) + "tabbi/api/sessions/{sid}/stream?after={last}",
    headers={{"Authorization": "token " + cl.token}}))
s.prompt("stream")
received = []
while True:
    event = json.loads(await ws.read_message())
    if event["type"] == "text.delta":
        received.append((time.time(), event["data"]["delta"]))
    if event["type"] == "turn.finished":
        break
ws.close()
replays, count = [], 0
for _ in range({rounds}):
    t0 = time.perf_counter(); count = len(s.events(0)); replays.append(time.perf_counter() - t0)
print("RESULT", json.dumps({{"received": received, "replays": replays, "events": count}}))
"""


async def measure(kernel: HubKernel, llm: ScriptedLLM, repo: str, rounds: int, chunks: int) -> dict[str, Any]:
    def result(out: str) -> dict[str, Any]:
        return json.loads(out.split("RESULT ", 1)[1])

    first = result(await kernel.run(SETUP.format(rounds=rounds, repo=repo), 300))
    script(llm, chunks)
    stream = STREAM.format(rounds=rounds, sid=first["sid"], last=first["last"])
    second = result(await kernel.run(stream, 300))
    return {"trips": first["trips"], "start": first["start"], "events": second["events"],
            "deltas": latencies(llm, [tuple(r) for r in second["received"]]), "replays": second["replays"]}


async def personal(llm: ScriptedLLM, work: Path, rounds: int, chunks: int) -> dict[str, Any]:
    server = JupyterProcess(llm.url, work / "personal",
                            extra=[f"--TabbiExtension.start_timeout={START_TIMEOUT}"])
    try:
        kernel_id = server.call("POST", "api/kernels", {"name": "python3"})["id"]
        socket = await websocket_connect(HTTPRequest(
            f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels",
            headers={"Authorization": f"token {server.token}"}))
        kernel = HubKernel(socket)
        try:
            return await measure(kernel, llm, str(sample_repo(Path(tempfile.mkdtemp()))), rounds, chunks)
        finally:
            kernel.close()
    finally:
        server.stop()


async def hub_mode(llm: ScriptedLLM, work: Path, rounds: int, chunks: int) -> dict[str, Any]:
    env = {"TABBI_LLM_BASE_URL": llm.url, "TABBI_MODEL": "scripted"}
    config = {"local_repo_roots": [REPOS + "/{username}"], "start_timeout": START_TIMEOUT}
    hub = Hub(work / "hub", [USER], env, config, service_user=SERVICE)
    try:
        repo = hub.shared_repo(REPOS, USER)
        hub.start_server(USER)
        kernel = await hub.kernel(USER)
        try:
            return await measure(kernel, llm, repo, rounds, chunks)
        finally:
            kernel.close()
    finally:
        hub.stop()


def line(name: str, base: list[float], hub: list[float]) -> str:
    ratio = statistics.median(hub) / statistics.median(base)
    pad = " " * 22
    return f"{name:<22} personal {summary(base)}\n{pad} hub      {summary(hub)}\n{pad} ratio {ratio:.2f}x"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    chunks = 100
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    try:
        base = asyncio.run(personal(llm, work, rounds, chunks))
        hub = asyncio.run(hub_mode(llm, work, rounds, chunks))
    finally:
        llm.stop()
    print(f"machine: {machine()}")
    print(f"hub mode vs personal mode, from a kernel; {rounds} rounds, {chunks} deltas, "
          f"{base['events']}/{hub['events']} events replayed")
    print(line("round trip (health)", base["trips"], hub["trips"]))
    print(f"{'start (to running)':<22} personal {base['start']:.2f} s, hub {hub['start']:.2f} s, "
          f"ratio {hub['start'] / base['start']:.2f}x")
    print(line("delta latency", base["deltas"], hub["deltas"]))
    print(line("event replay", base["replays"], hub["replays"]))


if __name__ == "__main__":
    main()

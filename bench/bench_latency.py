"""Latency of streamed text: from the model server writing a delta to a client receiving it.

tabbi's path: model -> OpenCode -> tabbi's SSE consumer -> normalize -> SQLite -> WebSocket client.
The baseline, measured in the same run against the same scripted model: a client reading OpenCode's
own SSE directly. Run: ``.venv/bin/python bench/bench_latency.py [CHUNKS]``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from harness import BareOpenCode, JupyterProcess, ScriptedLLM, machine, percentile, sample_repo
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from tests.support.llm import Reply


def script(llm: ScriptedLLM, chunks: int) -> None:
    text = "".join(f"w{i:04d};" for i in range(chunks))
    llm.emitted.clear()
    llm.enqueue(Reply(text=text, chunks=chunks, drip=0.02))


def latencies(llm: ScriptedLLM, received: list[tuple[float, str]]) -> list[float]:
    emitted = {piece: at for at, piece in llm.emitted}
    out = []
    for at, delta in received:
        for piece in (p + ";" for p in delta.split(";") if p):
            if piece in emitted:
                out.append(at - emitted.pop(piece))
    return out


async def through_tabbi(server: JupyterProcess, llm: ScriptedLLM, repo: Path, chunks: int) -> list[float]:
    sid = server.call("POST", "tabbi/api/sessions", {"repo": str(repo)})["id"]
    server.wait_event(sid, lambda e: e["type"] == "session.status" and e["data"]["state"] == "running")
    server.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "warm up"})
    last = server.wait_event(sid, lambda e: e["type"] == "turn.finished")["seq"]
    ws = await websocket_connect(HTTPRequest(
        f"ws://127.0.0.1:{server.port}/tabbi/api/sessions/{sid}/stream?after={last}",
        headers={"Authorization": f"token {server.token}"}))
    script(llm, chunks)
    server.call("POST", f"tabbi/api/sessions/{sid}/prompt", {"text": "stream"})
    received = []
    while True:
        event = json.loads(await asyncio.wait_for(ws.read_message(), 60))
        if event["type"] == "text.delta":
            received.append((time.time(), event["data"]["delta"]))
        if event["type"] == "turn.finished":
            break
    ws.close()
    server.call("DELETE", f"tabbi/api/sessions/{sid}")
    return latencies(llm, received)


async def direct(llm: ScriptedLLM, repo: Path, chunks: int) -> list[float]:
    oc = BareOpenCode(llm, repo)
    oc.wait_healthy()
    headers = {"Authorization": oc.auth}
    try:
        async with httpx.AsyncClient(base_url=oc.url, headers=headers, timeout=60) as client:
            sid = (await client.post("/session", json={})).json()["id"]
            for text, is_warmup in (("warm up", True), ("stream", False)):
                if not is_warmup:
                    script(llm, chunks)
                received = []
                async with client.stream("GET", "/event", timeout=httpx.Timeout(60)) as stream:
                    lines = stream.aiter_lines()
                    await anext(lines)  # server.connected
                    body = {"model": oc.model_ref, "parts": [{"type": "text", "text": text}]}
                    await client.post(f"/session/{sid}/prompt_async", json=body)
                    async for line in lines:
                        if not line.startswith("data:"):
                            continue
                        event = json.loads(line[5:])
                        props = event.get("properties", {})
                        if event["type"] == "message.part.delta" and props.get("sessionID") == sid:
                            received.append((time.time(), props.get("delta", "")))
                        if event["type"] == "session.idle" and props.get("sessionID") == sid:
                            break
            return latencies(llm, received)
    finally:
        oc.stop()


def report(name: str, values: list[float]) -> tuple[float, float]:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    print(f"{name}: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms (n={len(values)})")
    return p50, p99


async def main(chunks: int) -> None:
    llm = ScriptedLLM().start()
    work = Path(tempfile.mkdtemp(prefix="tabbi-bench-latency-"))
    repo = sample_repo(work)
    try:
        baseline = await direct(llm, repo, chunks)
        server = JupyterProcess(llm.url, work / "server")
        try:
            tabbi = await through_tabbi(server, llm, repo, chunks)
        finally:
            server.stop()
    finally:
        llm.stop()
    print(f"machine: {machine()}")
    b50, b99 = report("OpenCode SSE read directly ", baseline)
    t50, t99 = report("tabbi WebSocket client     ", tabbi)
    print(f"ratio p50 {t50 / b50:.2f}, p99 {t99 / b99:.2f}; added p50 {(t50 - b50) * 1000:.2f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))

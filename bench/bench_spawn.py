"""What starting one sandbox process costs the server's event loop: ``local._spawn`` (the
parent-death signal set by ``setpriv``, so CPython can vfork) against the former way (a
``preexec_fn``, which forces a full fork of the server), in the same run, for servers of several
sizes (the server's memory is what a fork copies).

Run: ``.venv/bin/python bench/bench_spawn.py [N]``. Prints the time each start holds the loop.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time

from harness import machine

from tabbi_sandbox import local


async def _hold(n: int, via_setpriv: bool) -> list[float]:
    """Seconds each ``create_subprocess_exec`` of ``true`` holds the event loop."""
    held = []
    for _ in range(n):
        started = time.perf_counter()
        if via_setpriv:
            proc = await local._spawn(["true"])
        else:
            proc = await asyncio.create_subprocess_exec("true", start_new_session=True,
                                                        preexec_fn=local._die_with_parent)
        held.append(time.perf_counter() - started)
        await proc.wait()
    return held


def main(n: int = 30) -> None:
    if local.SETPRIV is None:
        sys.exit("setpriv (util-linux) is not installed: _spawn falls back to preexec_fn")
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f}")
    ballast = bytearray()
    for size_mb in (100, 400, 1600):
        ballast.extend(b"\1" * ((size_mb << 20) - len(ballast)))  # touched: really resident
        old = asyncio.run(_hold(n, via_setpriv=False))
        new = asyncio.run(_hold(n, via_setpriv=True))
        o, w = statistics.median(old), statistics.median(new)
        print(f"server of {size_mb:>5} MB: preexec_fn {o * 1000:7.2f} ms, setpriv {w * 1000:6.2f} ms "
              f"(median of {n}); setpriv / preexec_fn = {w / o:.3f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))

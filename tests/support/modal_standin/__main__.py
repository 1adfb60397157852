"""``python -m tests.support.modal_standin``: the stand-in as a process of its own.

Prints its ``env`` (and the tunnel CA file) as one JSON line, then serves until SIGTERM/SIGINT or
until its stdin is closed (so it dies with whoever started it with a pipe).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .server import ModalStandIn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--internet-port", type=int, action="append", default=[], help="host port to forward")
    parser.add_argument(
        "--install", action="append", default=[], help="SANDBOX_PATH=HOST_PATH, bound read-only"
    )
    args = parser.parse_args()
    installed = dict(item.split("=", 1) for item in args.install)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with ModalStandIn(internet_ports=args.internet_port, installed=installed) as standin:
        print(json.dumps({**standin.env, "CA_FILE": str(standin.ca_file)}), flush=True)
        stop.wait()


if __name__ == "__main__":
    main()

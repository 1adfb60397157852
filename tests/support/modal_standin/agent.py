"""The stand-in's agent inside one sandbox: the process every exec of that sandbox is forked from.

Run by the sandbox's own ``python3`` as the first process of the sandbox's bubblewrap (its mount,
PID and network namespaces), so an exec shares the container with the entrypoint and every other
exec exactly as on Modal: same files, same ``/tmp``, same processes visible in ``/proc``, same
``127.0.0.1``. It talks to the stand-in over one inherited ``SOCK_SEQPACKET`` socket (no path in
the sandbox a process could connect to) and hands back file descriptors rather than copying
bytes: an exec's pipes, a TCP connection it opened to a port of the sandbox (a tunnel), or a
connection accepted on a forwarded port (the sandbox reaching "the internet").

Standard library only, no imports from the test suite: this file is bound read-only into the
sandbox and must run with whatever ``python3`` the image has.

Messages are JSON objects, one per datagram, with file descriptors as ``SCM_RIGHTS``.
Requests: ``exec`` {id, argv, env, cwd, stdin, stdout, stderr}, ``kill`` {id, signal},
``connect`` {id, port}, ``forward`` {port}. Replies/events: ``started`` {id, pid} + pipe fds,
``exit`` {id, returncode}, ``connected`` {id} + socket fd, ``error`` {id, message}, ``inbound``
{port} + accepted socket fd.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading

MAX_MESSAGE = 1 << 20

_send_lock = threading.Lock()
_children = {}


def send(channel, message, fds=()):
    data = json.dumps(message).encode()
    with _send_lock:
        socket.send_fds(channel, [data], list(fds))


def run_exec(channel, request):
    ident = request["id"]
    env = dict(os.environ)
    env.update(request.get("env") or {})
    streams = {}
    for name in ("stdin", "stdout", "stderr"):
        streams[name] = subprocess.PIPE if request.get(name) == "pipe" else subprocess.DEVNULL
    try:
        child = subprocess.Popen(
            request["argv"],
            env=env,
            cwd=request.get("cwd") or None,
            close_fds=True,
            start_new_session=True,  # its own process group: a timeout kills what it started too
            **streams,
        )
    except OSError as exc:
        send(channel, {"op": "error", "id": ident, "message": f"{request['argv'][0]}: {exc.strerror}"})
        return
    except Exception as exc:  # the agent must outlive any request
        send(channel, {"op": "error", "id": ident, "message": f"{request['argv'][0]}: {exc}"})
        return
    _children[ident] = child
    fds, names = [], []
    for name in ("stdin", "stdout", "stderr"):
        pipe = getattr(child, name)
        if pipe is not None:
            fds.append(pipe.fileno())
            names.append(name)
    send(channel, {"op": "started", "id": ident, "pid": child.pid, "fds": names}, fds)
    for name in names:
        getattr(child, name).close()  # the stand-in holds its copies now
    threading.Thread(target=reap, args=(channel, ident, child), daemon=True).start()


def reap(channel, ident, child):
    code = child.wait()
    _children.pop(ident, None)
    send(channel, {"op": "exit", "id": ident, "returncode": code})  # negative: killed by that signal


def kill(request):
    child = _children.get(request["id"])
    if child is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, request.get("signal", signal.SIGKILL))


def connect(channel, request):
    try:
        conn = socket.create_connection(("127.0.0.1", request["port"]), timeout=5)
    except OSError as exc:
        send(channel, {"op": "error", "id": request["id"], "message": str(exc)})
        return
    send(channel, {"op": "connected", "id": request["id"]}, [conn.fileno()])
    conn.close()


def forward(channel, port):
    """Listen on 127.0.0.1:port inside the sandbox; each connection goes out to the stand-in."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        send(channel, {"op": "inbound", "port": port}, [conn.fileno()])
        conn.close()


def main():
    channel = socket.socket(fileno=int(sys.argv[1]))
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(channel, MAX_MESSAGE, 4)
        except OSError:
            return
        for fd in fds:
            os.close(fd)
        if not data:
            return  # the stand-in went away: the sandbox ends with it
        request = json.loads(data)
        op = request.get("op")
        if op == "exec":
            run_exec(channel, request)
        elif op == "kill":
            kill(request)
        elif op == "connect":
            threading.Thread(target=connect, args=(channel, request), daemon=True).start()
        elif op == "forward":
            threading.Thread(target=forward, args=(channel, request["port"]), daemon=True).start()


if __name__ == "__main__":
    main()

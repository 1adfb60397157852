"""Running the stand-in: a grpclib server on 127.0.0.1 in its own thread and event loop.

In-process rather than a subprocess so tests can read what it saw (``recorder``, ``sandboxes``,
``images``) directly, and fast to start (~0.1 s). Its own thread and loop keep it independent of
the test's loop and of the client's (synchronicity runs the ``modal`` client on a loop thread of
its own): a blocked test never blocks the stand-in. Its sandboxes die with the process that
runs it (bubblewrap's ``--die-with-parent``), never with a Jupyter server under test, which is a
separate process talking to it over ``MODAL_SERVER_URL``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpclib.server

from .control import ControlPlane
from .images import Image, check_target
from .router import CommandRouter
from .rpc import Recorder
from .sandboxes import Sandbox
from .state import Options, State

#: Whether ``ModalStandIn(users=...)`` works here: changing user inside a sandbox needs
#: capabilities that bubblewrap grants only when it runs as root.
USERS_WORK = os.geteuid() == 0


class ModalStandIn:
    """A loopback stand-in of Modal's API for the real ``modal`` client.

    ``start()``/``stop()`` or ``with ModalStandIn() as modal_api:``; ``env`` is what the client
    needs (put it in ``os.environ`` or a server subprocess's environment before the client is
    first used: ``modal.Client.from_env()`` caches one client per process).
    """

    def __init__(
        self,
        *,
        internet_ports: list[int] | None = None,
        installed: dict[str, str] | None = None,
        users: dict[str, int] | None = None,
        list_page_size: int = 50,
        data_dir: str | Path | None = None,
    ):
        """``internet_ports``: host ports on 127.0.0.1 a sandbox may reach (at the same address
        inside), standing in for the internet (the LLM, GitHub). ``installed``: what an image's
        ``RUN``/``apt``/``npm`` layers would have installed, as ``{sandbox path: host path}``
        bound read-only into every sandbox (for example OpenCode at /usr/local/bin/opencode);
        the path must be under /usr/local, /opt or another non-system folder. ``users``: what
        the recipe's ``useradd`` would have made, ``{name: uid}`` (gid = uid, home /home/<name>
        owned by it); root in the sandbox may then change user (``setpriv``, ``su``), chown and
        kill, as root in a container can. Needs the stand-in to run as root (``USERS_WORK``)."""
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="modal-standin-"))
        self.recorder = Recorder()
        for path in installed or {}:
            check_target(path)
        if users and not USERS_WORK:
            raise RuntimeError("the modal stand-in can give sandboxes users only when it runs as root")
        self.options = Options(
            internet_ports=list(internet_ports or []),
            installed={path: os.path.realpath(host) for path, host in (installed or {}).items()},
            list_page_size=list_page_size,
            users=dict(users or {}),
        )
        self.state: State | None = None
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpclib.server.Server | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> ModalStandIn:
        started: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="modal-standin", daemon=True)
        self._thread.start()
        started.result(timeout=30)
        return self

    def _run(self, started: concurrent.futures.Future) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            started.set_exception(exc)
            raise
        started.set_result(None)
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self) -> None:
        self.state = State(self.data_dir, self.options, self.recorder)
        self._server = grpclib.server.Server([ControlPlane(self.state), CommandRouter(self.state)])
        await self._server.start("127.0.0.1", 0)
        port = self._server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self.state.router_url = self.url

    async def _shutdown(self) -> None:
        assert self.state is not None and self._server is not None
        await self.state.close()
        self._server.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        # grpclib leaves its clients' connections open (Python 3.11's asyncio.Server cannot close
        # them): close every transport of this loop so nothing is left for the garbage collector.
        for transport in list(getattr(asyncio.get_running_loop(), "_transports", {}).values()):
            transport.close()
        # What is left (output pumps, removal of sandbox folders) finishes or is cancelled.
        rest = asyncio.all_tasks() - {asyncio.current_task()}
        if rest:
            _, pending = await asyncio.wait(rest, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self.call(self._shutdown(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> ModalStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the stand-in's loop from another thread and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- what the client needs --------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point the real ``modal`` client here."""
        return {
            "MODAL_SERVER_URL": self.url,
            "MODAL_TOKEN_ID": self.options.token_id,
            "MODAL_TOKEN_SECRET": self.options.token_secret,
            "MODAL_CONFIG_PATH": "/nonexistent",
            "MODAL_DISABLE_API_PROXY": "1",
        }

    @contextlib.contextmanager
    def activated(self) -> Iterator[ModalStandIn]:
        """This process's ``modal`` client talks to this stand-in inside the block: ``env`` is in
        ``os.environ`` and the client ``modal.Client.from_env()`` cached is dropped on the way in
        and out (it would still point at the previous server)."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        _forget_modal_client()
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _forget_modal_client()

    @property
    def ca_file(self) -> Path:
        """The PEM certificate of the authority that signs tunnel certificates."""
        assert self.state is not None
        return self.state.authority.ca_file

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts the stand-in's tunnels (and nothing else)."""
        assert self.state is not None
        return self.state.authority.client_context()

    # -- what tests read and arrange --------------------------------------------------------------

    @property
    def sandboxes(self) -> dict[str, Sandbox]:
        """Every sandbox by id, ended ones too (a copy: the stand-in's thread adds to it)."""
        assert self.state is not None
        return dict(self.state.sandboxes)

    def image(self, image_id: str) -> Image:
        assert self.state is not None
        return self.state.store.get(image_id)

    def expire_image(self, image_id: str) -> None:
        """The image is gone, as a snapshot past its TTL is: ``Image.from_id`` and creating a
        sandbox from it answer NOT_FOUND from now on."""
        assert self.state is not None
        self.state.store.images.pop(image_id)

    def allow_internet(self, port: int) -> None:
        """Let sandboxes created from now on reach host port ``port`` (see ``internet_ports``)."""
        self.options.internet_ports.append(port)

    def add_secret(self, name: str, env: dict[str, str], environment: str = "main") -> str:
        """A named secret, as if created in Modal's dashboard (``modal.Secret.from_name``)."""
        assert self.state is not None
        return self.state.store.add_secret(env, name, environment)

    def sandbox_path(self, sandbox_id: str, path: str) -> Path:
        """Where a path of a running sandbox's writable file tree is on the host."""
        return self.sandboxes[sandbox_id].fs / path.lstrip("/")

    def check(self) -> None:
        """Fail if the stand-in had an internal error or was asked for what it does not implement."""
        problems = [*self.recorder.errors, *(f"unimplemented RPC {n}" for n in self.recorder.unimplemented)]
        if problems:
            raise AssertionError("modal stand-in: " + "\n".join(problems))


@contextlib.contextmanager
def modal_standin(**options) -> Iterator[ModalStandIn]:
    """A started and activated stand-in; afterwards every sandbox is killed, its data removed,
    and ``check()`` fails the caller if the stand-in failed or was asked for what it lacks."""
    standin = ModalStandIn(**options)
    standin.start()
    try:
        with standin.activated():
            yield standin
        standin.check()
    finally:
        standin.stop()


def _forget_modal_client() -> None:
    from modal.client import _Client

    _Client._client_from_env = None

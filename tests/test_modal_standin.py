"""The Modal stand-in behaves as Modal does for the real, pinned ``modal`` client.

``ModalProvider`` is tested against ``tests.support.modal_standin``; if the stand-in accepted an
exec on a terminated sandbox, lost a sandbox's environment, let a sandbox see the host, served a
tunnel without TLS or never enforced an idle timeout, those tests would prove nothing. Every test
here drives the stand-in through the real client (sync and ``.aio``), never through its internals.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tabbi_sandbox.binary import find_opencode
from tabbi_sandbox.isolation import bwrap_works

modal = pytest.importorskip("modal")

from grpclib import GRPCError, Status  # noqa: E402
from grpclib.client import Channel  # noqa: E402
from modal_proto import task_command_router_pb2 as router_pb2  # noqa: E402
from modal_proto.task_command_router_grpc import TaskCommandRouterStub  # noqa: E402

from tests.support.modal_standin import USERS_WORK, ModalStandIn, modal_standin  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not bwrap_works()[0], reason="the Modal stand-in runs sandboxes under bubblewrap"),
    pytest.mark.timeout(120),
]

REPO = Path(__file__).resolve().parents[1]


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the internet\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def internet():
    """A host service standing in for "the internet": reachable from sandboxes only as forwarded."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def standin(internet):
    opencode = find_opencode()
    with modal_standin(
        internet_ports=[internet],
        installed={"/usr/local/bin/opencode": opencode},
        users={"agent": 1000} if USERS_WORK else {},
        list_page_size=2,
    ) as api:
        yield api


@pytest.fixture(scope="module")
def app(standin):
    return modal.App.lookup("tabbi-standin-test", create_if_missing=True)


#: Exits 0 once no process in the sandbox has the command line argv[1], 1 after 5 s.
GONE_WITHIN_5S = """
import os, sys, time
def running():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/cmdline").read().replace("\\0", " ").strip() == sys.argv[1]:
                return True
        except OSError:
            pass
    return False
deadline = time.monotonic() + 5
while running():
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.05)
"""


def run(sb, *args: str, **kwargs) -> tuple[int, str, str]:
    process = sb.exec(*args, **kwargs)
    out, err = process.stdout.read(), process.stderr.read()
    return process.wait(), out, err


def test_create_with_env_secrets_tags_workdir(standin: ModalStandIn, app):
    standin.add_secret("team-keys", {"TEAM_KEY": "from-a-named-secret", "SHARED": "named"})
    sb = modal.Sandbox.create(
        "sleep",
        "300",
        app=app,
        env={"PLAIN": "plain-value", "SHARED": "env"},
        secrets=[modal.Secret.from_name("team-keys"), modal.Secret.from_dict({"DICT_KEY": "from-a-dict"})],
        tags={"tabbi_session": "s1", "tabbi_owner": "alice"},
        workdir="/workspace",
        cpu=0.5,
        memory=512,
        timeout=120,
    )
    try:
        code, out, err = run(sb, "sh", "-c", 'echo "$PLAIN $TEAM_KEY $DICT_KEY $SHARED"; pwd; echo oops >&2')
        assert (code, out, err) == (
            0,
            "plain-value from-a-named-secret from-a-dict env\n/workspace\n",
            "oops\n",
        )
        # Exec env adds to (and overrides) the container's, as on Modal.
        code, out, _ = run(
            sb, "sh", "-c", "echo $PLAIN-$EXTRA", env={"PLAIN": "over", "EXTRA": "x"}, workdir="/tmp"
        )
        assert (code, out) == (0, "over-x\n")
        assert sb.get_tags() == {"tabbi_session": "s1", "tabbi_owner": "alice"}
        sb.set_tags({"tabbi_session": "s1", "tabbi_owner": "bob"})
        assert sb.get_tags()["tabbi_owner"] == "bob"
        resources = standin.sandboxes[sb.object_id].definition.resources
        assert (resources.milli_cpu, resources.memory_mb) == (500, 512)
        assert sb.poll() is None
    finally:
        sb.terminate()
    assert sb.wait(raise_on_termination=False) is None
    assert sb.returncode == 137  # terminated


def test_exec_streams_stdin_and_exit_codes(app):
    sb = modal.Sandbox.create(app=app, timeout=120)
    try:
        script = 'while read line; do echo "got $line"; echo "err $line" >&2; done; exit 7'
        process = sb.exec("sh", "-c", script, bufsize=1)
        process.stdin.write(b"one\ntwo\n")
        process.stdin.write_eof()
        process.stdin.drain()
        lines = list(process.stdout)
        assert lines == ["got one\n", "got two\n"]
        assert process.stderr.read() == "err one\nerr two\n"
        assert process.wait() == 7
        assert process.poll() == 7
        slow = sb.exec("sh", "-c", "sleep 0.5; echo late")
        assert slow.poll() is None
        assert slow.stdout.read() == "late\n"
        assert slow.wait() == 0
        killed = sb.exec("sh", "-c", "kill -9 $$")
        assert killed.wait() == 137
        assert run(sb, "/no/such/program")[0] == 127
        with pytest.raises(modal.exception.InvalidError):  # refused, and the sandbox lives on
            sb.exec("echo", "nul\x00byte")
        assert run(sb, "true")[0] == 0
        big = sb.exec("python3", "-c", "import sys; sys.stdout.write('x' * 300000)")
        assert len(big.stdout.read()) == 300000
    finally:
        sb.terminate()


def test_exec_shares_the_container_with_the_entrypoint(app):
    """Realism the provider's push design depends on: an exec is not a fresh container. It sees
    the entrypoint's processes and files and every other exec's, as on Modal."""
    sb = modal.Sandbox.create("sh", "-c", "echo started > /tmp/entry; exec sleep 300", app=app, timeout=120)
    try:
        marker = sb.exec("sh", "-c", "echo secret-ish > /tmp/from-exec; sleep 300")
        code, out, _ = run(
            sb,
            "sh",
            "-c",
            "until [ -s /tmp/from-exec ]; do sleep 0.05; done; cat /tmp/entry /tmp/from-exec; "
            "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
        )
        assert code == 0
        assert out.startswith("started\nsecret-ish\n")
        assert "sleep 300" in out  # the entrypoint and the other exec are visible
        assert marker.poll() is None
    finally:
        sb.terminate()


@pytest.mark.skipif(not USERS_WORK, reason="users in sandboxes need the stand-in to run as root")
def test_users_the_recipe_would_make(app):
    """Root in the sandbox drops to the recipe's user as on Modal; that user then cannot read
    root's files or the environment of root's processes (the threat: the agent, as that user,
    reading a secret tabbi's root exec holds)."""
    sb = modal.Sandbox.create(
        "sleep", "300", app=app, timeout=120, env={"CONTAINER_WIDE": "everyone"}, workdir="/workspace"
    )
    try:
        prepare = "echo mine > /root/private && chmod 600 /root/private && chown agent /workspace"
        assert run(sb, "sh", "-c", prepare)[0] == 0
        holder = sb.exec("sh", "-c", "echo up; exec sleep 300", env={"EXEC_SECRET": "s3cret"}, bufsize=1)
        assert next(iter(holder.stdout)) == "up\n"  # it runs, holding the secret
        _, out, err = run(
            sb, "setpriv", "--reuid=agent", "--regid=agent", "--init-groups", "--",
            "sh", "-c", "id -un; touch /workspace/ok && echo wrote; cat /root/private; "
            "cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep SECRET; cd /home/agent && touch h && pwd; "
            "echo $CONTAINER_WIDE",
        )  # fmt: skip
        # Create-time env and secrets reach every exec, whatever user it then becomes (as on Modal).
        assert out.splitlines() == ["agent", "wrote", "/home/agent", "everyone"], err
        assert "/root/private: Permission denied" in err
        assert "s3cret" not in out
        # Positive control: the secret is there to be read, by root.
        assert "EXEC_SECRET=s3cret" in run(sb, "sh", "-c", "cat /proc/[0-9]*/environ | tr '\\0' '\\n'")[1]
    finally:
        sb.terminate()


def test_sandbox_cannot_see_the_host(standin: ModalStandIn, app):
    """Threat: a sandbox process reads the host's checkout, the stand-in's data (other sandboxes,
    images, the tunnel key) or reaches host services that were not forwarded."""
    sb = modal.Sandbox.create(app=app, timeout=120)
    try:
        code, out, _ = run(
            sb,
            "sh",
            "-c",
            f"ls {REPO} {standin.data_dir} /work 2>&1; cat /etc/shadow 2>&1; id -u; ls /root; hostname",
        )
        assert str(REPO / "tests") not in out and "tls" not in out
        assert "No such file" in out
        assert "modal" in out
        host_probe = "import socket; socket.create_connection(('127.0.0.1', %d), timeout=2)"
        code, _, err = run(sb, "python3", "-c", host_probe % int(standin.url.rsplit(":", 1)[1]))
        assert code != 0 and "ConnectionRefused" in err
    finally:
        sb.terminate()


def test_internet_ports_are_forwarded_unless_the_network_is_blocked(app, internet):
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{internet}/').read().decode())"
    sb = modal.Sandbox.create(app=app, timeout=120)
    blocked = modal.Sandbox.create(app=app, timeout=120, block_network=True)
    try:
        assert run(sb, "python3", "-c", fetch)[:2] == (0, "hello from the internet\n\n")
        code, _, err = run(blocked, "python3", "-c", fetch)
        assert code != 0 and "Connection refused" in err
    finally:
        sb.terminate()
        blocked.terminate()


def test_tunnel_reaches_a_server_in_the_sandbox_over_tls(standin: ModalStandIn, app):
    sb = modal.Sandbox.create(
        "python3",
        "-m",
        "http.server",
        "8000",
        "--bind",
        "127.0.0.1",
        "--directory",
        "/workspace",
        app=app,
        timeout=120,
        workdir="/workspace",
        encrypted_ports=[8000],
        readiness_probe=modal.Probe.with_tcp(8000),
    )
    try:
        run(sb, "sh", "-c", "echo served > /workspace/index.txt")
        sb.wait_until_ready(timeout=30)
        url = sb.tunnels()[8000].url
        assert url.startswith("https://127.0.0.1:")
        response = httpx.get(f"{url}/index.txt", verify=standin.ssl_context(), timeout=10)
        assert (response.status_code, response.text) == (200, "served\n")
        # A client that does not trust the stand-in's authority is refused, as with a wrong cert.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url, verify=ssl.create_default_context(), timeout=10)
        # A fresh handle asks the control plane for the tunnels (SandboxGetTunnelsV2).
        assert modal.Sandbox.from_id(sb.object_id).tunnels()[8000].url == url
        # Every sandbox has its own network: another one can listen on the same port.
        twin = modal.Sandbox.create(
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "127.0.0.1",
            "--directory",
            "/tmp",
            app=app,
            timeout=120,
            encrypted_ports=[8000],
            readiness_probe=modal.Probe.with_tcp(8000),
        )
        twin.wait_until_ready(timeout=30)
        assert (
            httpx.get(twin.tunnels()[8000].url, verify=standin.ssl_context(), timeout=10).status_code == 200
        )
        twin.terminate()
    finally:
        sb.terminate()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=standin.ssl_context(), timeout=5)


def test_readiness_probe_exec_and_timeout(app):
    sb = modal.Sandbox.create(
        "sh",
        "-c",
        "sleep 0.3; touch /tmp/ready; sleep 300",
        app=app,
        timeout=120,
        readiness_probe=modal.Probe.with_exec("test", "-f", "/tmp/ready", interval_ms=50),
    )
    never = modal.Sandbox.create(app=app, timeout=120, readiness_probe=modal.Probe.with_tcp(9))
    try:
        sb.wait_until_ready(timeout=30)
        with pytest.raises(modal.exception.TimeoutError):
            never.wait_until_ready(timeout=1)
    finally:
        sb.terminate()
        never.terminate()


def test_image_recipe_is_recorded_and_its_files_are_there(standin: ModalStandIn, app, tmp_path: Path):
    (tmp_path / "bootstrap.py").write_text("print('boot')\n")
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "opencode.json").write_text("{}\n")
    image = (
        modal.Image.debian_slim()
        .apt_install("git", "curl")
        .pip_install("httpx==0.28.1")
        .run_commands("npm install -g opencode-ai@1.0.0")
        .env({"TABBI_IMAGE": "yes"})
        .add_local_file(tmp_path / "bootstrap.py", "/opt/tabbi/bootstrap.py", copy=True)
        .add_local_dir(tmp_path / "seed", "/opt/tabbi/seed")
    )
    sb = modal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        code, out, _ = run(
            sb,
            "sh",
            "-c",
            "python3 /opt/tabbi/bootstrap.py; cat /opt/tabbi/seed/opencode.json; echo $TABBI_IMAGE",
        )
        assert (code, out) == (0, "boot\n{}\nyes\n")
        commands = "\n".join(standin.image(standin.sandboxes[sb.object_id].image.image_id).commands)
        assert "apt-get install" in commands and "git curl" in commands
        assert "httpx==0.28.1" in commands and "npm install -g opencode-ai@1.0.0" in commands
    finally:
        sb.terminate()
    # The same recipe is the same image (Modal's layer cache).
    again = modal.Image.debian_slim().apt_install("git", "curl")
    first = modal.Image.debian_slim().apt_install("git", "curl")
    assert again.build(app).object_id == first.build(app).object_id


def test_installed_software_and_usr_local_belong_to_the_image(app):
    """What the recipe's npm/apt layers would install comes from the host read-only; the rest of
    /usr/local is the image's own, writable and kept by snapshots like any other folder."""
    sb = modal.Sandbox.create(app=app, timeout=120)
    try:
        size = f"{os.path.getsize(find_opencode())}\n"  # (running it takes seconds: not here)
        assert run(sb, "sh", "-c", "test -x $(command -v opencode) && stat -c %s /usr/local/bin/opencode")[
            :2
        ] == (
            0,
            size,
        )
        code, _, err = run(sb, "sh", "-c", "echo x > /usr/local/bin/opencode")
        assert code != 0 and "Read-only" in err
        assert (
            run(sb, "sh", "-c", "echo tool > /usr/local/bin/mytool && chmod +x /usr/local/bin/mytool")[0] == 0
        )
        code, _, err = run(sb, "sh", "-c", "touch /usr/bin/evil")
        assert code != 0 and "Read-only" in err
        image = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    restored = modal.Sandbox.create(app=app, image=image, timeout=120)
    try:
        assert run(restored, "cat", "/usr/local/bin/mytool")[:2] == (0, "tool\n")
        assert run(restored, "stat", "-c", "%s", "/usr/local/bin/opencode")[:2] == (0, size)
    finally:
        restored.terminate()


def test_exec_timeout_kills_the_process(app):
    sb = modal.Sandbox.create(app=app, timeout=120)
    try:
        process = sb.exec("sh", "-c", "echo started; sleep 60", timeout=1)
        # Whichever comes first: the client's deadline (it then answers -1) or the kill (137).
        assert process.wait() in (-1, 137)
        assert run(sb, "python3", "-c", GONE_WITHIN_5S, "sleep 60")[0] == 0
    finally:
        sb.terminate()


def test_snapshot_filesystem_restores_into_a_new_sandbox(standin: ModalStandIn, app):
    sb = modal.Sandbox.create(app=app, timeout=120, env={"NOT_IN_SNAPSHOT": "1"}, workdir="/workspace")
    try:
        run(
            sb,
            "sh",
            "-c",
            "mkdir -p /workspace/repo /root/.local && echo kept > /workspace/repo/f "
            "&& echo home > /root/.local/h && mkfifo /workspace/fifo",
        )
        image = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    restored = modal.Sandbox.create(app=app, image=modal.Image.from_id(image.object_id), timeout=120)
    try:
        code, out, _ = run(
            restored,
            "sh",
            "-c",
            "cat /workspace/repo/f /root/.local/h; test -p /workspace/fifo "
            '&& echo fifo; echo "[$NOT_IN_SNAPSHOT]"',
        )
        assert (code, out) == (0, "kept\nhome\nfifo\n[]\n")
    finally:
        restored.terminate()
    standin.expire_image(image.object_id)
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.create(app=app, image=modal.Image.from_id(image.object_id), timeout=60)


def test_a_deleted_snapshot_image_is_gone(app):
    sb = modal.Sandbox.create(app=app, timeout=120)
    try:
        image = sb.snapshot_filesystem()
    finally:
        sb.terminate()
    from modal.experimental import image_delete

    image_delete(image.object_id)
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.create(app=app, image=modal.Image.from_id(image.object_id), timeout=60)
    with pytest.raises(modal.exception.NotFoundError):
        image_delete(image.object_id)  # deleted once only; an unknown id is NOT_FOUND


def test_list_by_tags_pages_and_from_id_in_a_fresh_process(standin: ModalStandIn, app):
    tags = {"tabbi_server": f"srv-{time.monotonic_ns()}"}
    names = [f"s{i}-{time.monotonic_ns()}" for i in range(3)]
    made = [modal.Sandbox.create(app=app, timeout=120, tags=tags, name=name) for name in names]
    other = modal.Sandbox.create(app=app, timeout=120, tags={"tabbi_server": "someone-else"})
    try:
        run(made[0], "sh", "-c", "echo from-the-first > /tmp/x")
        listed = [sb.object_id for sb in modal.Sandbox.list(app_id=app.app_id, tags=tags)]  # pages of 2
        assert sorted(listed) == sorted(sb.object_id for sb in made)
        script = (
            "import modal, sys; sb = modal.Sandbox.from_id(sys.argv[1]); p = sb.exec('cat', '/tmp/x'); "
            "print(p.stdout.read(), end=''); print(p.wait())"
        )
        done = subprocess.run(
            [sys.executable, "-c", script, made[0].object_id],
            env={**os.environ, **standin.env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout == "from-the-first\n0\n", done.stderr
        assert modal.Sandbox.from_name("tabbi-standin-test", names[2]).object_id == made[2].object_id
        with pytest.raises(modal.exception.AlreadyExistsError):
            modal.Sandbox.create(app=app, timeout=120, name=names[2])
        made[1].terminate()
        assert made[1].object_id not in [
            sb.object_id for sb in modal.Sandbox.list(app_id=app.app_id, tags=tags)
        ]
    finally:
        for sb in [*made, other]:
            sb.terminate()


def test_terminated_sandbox_refuses_exec(app):
    sb = modal.Sandbox.create(app=app, timeout=120)
    run(sb, "true")
    sb.terminate()
    with pytest.raises(modal.exception.NotFoundError):  # the router: the task is gone
        sb.exec("true").wait()
    fresh = modal.Sandbox.from_id(sb.object_id)
    with pytest.raises(modal.exception.ConflictError):  # the control plane: already finished
        fresh.exec("true")
    assert fresh.poll() == 137
    with pytest.raises(modal.exception.SandboxTerminatedError):
        fresh.wait()


def test_entrypoint_stdio_and_exit_end_the_sandbox(app):
    sb = modal.Sandbox.create(
        "sh", "-c", 'read line; echo "got $line"; echo err >&2; exit 3', app=app, timeout=120
    )
    sb.stdin.write(b"hello\n")
    sb.stdin.write_eof()
    sb.stdin.drain()
    sb.wait(raise_on_termination=False)
    assert sb.returncode == 3
    assert (sb.stdout.read(), sb.stderr.read()) == ("got hello\n", "err\n")  # also after it ended


def test_idle_timeout_ends_an_idle_sandbox_but_not_a_busy_one(app):
    busy = modal.Sandbox.create(app=app, timeout=120, idle_timeout=1)
    idle = modal.Sandbox.create(app=app, timeout=120, idle_timeout=1)
    started = time.monotonic()
    assert busy.exec("sleep", "2.5").wait() == 0  # a running exec is activity
    assert busy.poll() is None
    with pytest.raises(modal.exception.SandboxTimeoutError):
        idle.wait()
    assert idle.returncode == 124
    with pytest.raises(modal.exception.SandboxTimeoutError):
        busy.wait()
    assert time.monotonic() - started >= 3.4


def test_timeout_ends_the_sandbox(app):
    sb = modal.Sandbox.create("sleep", "300", app=app, timeout=1)
    with pytest.raises(modal.exception.SandboxTimeoutError):
        sb.wait()


def test_async_api(app):
    async def scenario() -> None:
        sb = await modal.Sandbox.create.aio("sleep", "300", app=app, timeout=120, env={"X": "aio"})
        try:
            process = await sb.exec.aio("sh", "-c", "echo $X; cat")
            process.stdin.write(b"piped")
            process.stdin.write_eof()
            await process.stdin.drain.aio()
            assert await process.stdout.read.aio() == "aio\npiped"
            assert await process.wait.aio() == 0
            assert [s.object_id async for s in modal.Sandbox.list.aio(app_id=app.app_id)] != []
        finally:
            await sb.terminate.aio()
        assert await sb.poll.aio() == 137

    asyncio.run(scenario())


def test_strict_refusals(standin: ModalStandIn, app):
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.from_id("sb-doesnotexist000000000000").exec("true")
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.create(app=app, image=modal.Image.from_id("im-doesnotexist00000000000"), timeout=60)
    with pytest.raises(modal.exception.NotFoundError):
        modal.App.lookup("no-such-app")
    with pytest.raises(modal.exception.NotFoundError):
        modal.Sandbox.create(app=app, secrets=[modal.Secret.from_name("no-such-secret")], timeout=60)
    with pytest.raises(modal.exception.InvalidError):
        modal.Sandbox.create(app=app, timeout=24 * 3600 + 1)
    with pytest.raises(modal.exception.InvalidError):
        modal.Image.debian_slim().add_local_file(__file__, "/usr/bin/x", copy=True).build(app)


def test_wrong_credentials_and_forged_router_tokens_are_refused(standin: ModalStandIn, app):
    wrong = modal.Client.from_credentials(standin.env["MODAL_TOKEN_ID"], "as-wrong")
    with pytest.raises(modal.exception.AuthError):
        modal.App.lookup("x", create_if_missing=True, client=wrong)
    assert "unauthenticated:AppGetOrCreate" in standin.recorder.calls
    sb = modal.Sandbox.create(app=app, timeout=120)
    task_id = standin.sandboxes[sb.object_id].task_id

    async def forged(token: str) -> Status:
        host, port = standin.url.removeprefix("http://").split(":")
        channel = Channel(host, int(port))
        try:
            await TaskCommandRouterStub(channel).TaskExecStart(
                router_pb2.TaskExecStartRequest(task_id=task_id, exec_id="x", command_args=["id"]),
                metadata={"authorization": f"Bearer {token}"},
            )
        except GRPCError as exc:
            return exc.status
        finally:
            channel.close()
        return Status.OK

    try:
        header, body, _ = standin.state.jwt({"task_id": task_id}).split(".")
        assert asyncio.run(forged(f"{header}.{body}.AAAA")) == Status.UNAUTHENTICATED
        other = standin.state.jwt({"task_id": "ta-someoneelsesV"})
        assert asyncio.run(forged(other)) == Status.UNAUTHENTICATED
    finally:
        sb.terminate()


def test_runs_as_a_process_of_its_own(tmp_path: Path):
    """``python -m tests.support.modal_standin`` (benchmarks, manual use): env on the first line."""
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.modal_standin"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        env = json.loads(server.stdout.readline())
        script = "import modal; print(modal.App.lookup('p', create_if_missing=True).app_id[:3])"
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stdout == "ap-\n", done.stderr
    finally:
        server.stdin.close()  # it stops when its stdin closes
        assert server.wait(timeout=30) == 0


def test_unknown_rpcs_fail_loudly_and_are_logged(standin: ModalStandIn, app):
    with pytest.raises(modal.exception.UnimplementedError):
        modal.Volume.from_name("data", create_if_missing=True).hydrate()
    assert "VolumeGetOrCreate" in standin.recorder.unimplemented
    standin.recorder.unimplemented.clear()  # expected here; any other one fails the module

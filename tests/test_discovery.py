"""How a kernel finds its server: explicit override, JupyterHub, then the runtime file of its
parent server (stale files of dead servers must not be picked)."""

from __future__ import annotations

import json

import pytest

from tabbi_kernel.discovery import ServerNotFound, find_server


def runtime_file(folder, pid, url, token):
    path = folder / f"jpserver-{pid}.json"
    path.write_text(json.dumps({"pid": pid, "url": url, "token": token}))
    return path


def test_runtime_file_of_the_parent_server_wins_over_stale_ones(tmp_path):
    runtime_file(tmp_path, 111, "http://127.0.0.1:1111/", "stale")
    runtime_file(tmp_path, 222, "http://127.0.0.1:2222/", "mine")
    (tmp_path / "jpserver-333.json").write_text("{not json")
    info = find_server({"JPY_PARENT_PID": "222", "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    assert (info.url, info.token) == ("http://127.0.0.1:2222/", "mine")
    assert "jpserver-222.json" in info.route
    assert "mine" not in repr(info)  # the token stays out of reprs (and so out of logs)


def test_jupyterhub_and_explicit_override():
    hub = {"JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:9/user/ada/", "JUPYTERHUB_API_TOKEN": "t"}
    assert find_server(hub).url == "http://127.0.0.1:9/user/ada/"
    explicit = {**hub, "TABBI_SERVER_URL": "http://127.0.0.1:7/", "TABBI_SERVER_TOKEN": "x"}
    info = find_server(explicit)
    assert (info.url, info.token, info.route) == ("http://127.0.0.1:7/", "x", "TABBI_SERVER_URL")


def test_the_error_lists_every_route_tried(tmp_path):
    runtime_file(tmp_path, 111, "http://127.0.0.1:1111/", "stale")
    with pytest.raises(ServerNotFound) as err:
        find_server({"JPY_PARENT_PID": "999", "JUPYTER_RUNTIME_DIR": str(tmp_path)})
    message = str(err.value)
    assert "TABBI_SERVER_URL + TABBI_SERVER_TOKEN: not set" in message
    assert "JupyterHub" in message and "no jpserver-999.json" in message
    assert "set TABBI_SERVER_URL" in message
    with pytest.raises(ServerNotFound, match="JPY_PARENT_PID is not set"):
        find_server({"JUPYTER_RUNTIME_DIR": str(tmp_path)})

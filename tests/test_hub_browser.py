"""A person on a real JupyterHub, in headless Chromium: signs in at the hub, opens a notebook in
JupyterLab through the hub's proxy, starts a session from a cell, chats in the panel, and pushes
the notebook's cells; tabbi runs as the hub's service (tests/support/hub.py, as test_hub.py).

This hub is configured the lean way: users' servers get no ``TABBI_SERVICE_URL``, only the hub's
public URL, so the kernel finds the service by itself (tabbi_kernel/discovery.py). The person is
``dora`` and the service's user ``tabbisvcb``: not test_hub.py's users, since both modules may
run at once in parallel workers and each creates and removes its own OS users.

Threats covered here: the service (another OS user) reading the person's notebook to push its
cells (the kernel, as the person, sends them instead); the model's markup run in the page.
"""

from __future__ import annotations

import json
import pwd
from pathlib import Path

import nbformat
import pytest

from tests.support.hub import Hub, as_user
from tests.support.llm import Reply, write
from tests.test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, chat_notebook
from tests.test_hub import SECRETS, llm, pytestmark  # noqa: F401  (the module's model; same skips)

PERSON, SERVICE = "dora", "tabbisvcb"
REPOS = f"/home/{SERVICE}/repos"
pytestmark = [pytestmark, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory, llm):  # noqa: F811
    env = {**SECRETS, "TABBI_LLM_BASE_URL": llm.url, "TABBI_MODEL": "scripted"}
    started = Hub(tmp_path_factory.mktemp("hub"), [PERSON], env,
                  {"local_repo_roots": [REPOS + "/{username}"]}, service_user=SERVICE, lab=True, probe=True)
    try:
        started.shared_repo(REPOS, PERSON)
        # The announcements pop-up would cover the page.
        as_user(PERSON, "mkdir", "-p", f"/home/{PERSON}/.jupyter/labconfig")
        as_user(PERSON, "sh", "-c", "cat > ~/.jupyter/labconfig/page_config.json", input=json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        started.start_server(PERSON)
        yield started
    finally:
        started.stop()


def test_a_person_chats_in_the_panel_through_the_hub(hub, llm):  # noqa: F811
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is part of the set-up (scripts/setup.sh)"
    repo = f"{REPOS}/{PERSON}/repo"
    notebook = chat_notebook(
        nbformat.v4.new_code_cell("%load_ext tabbi_kernel\nfrom tabbi_kernel.discovery import find_server\n"
                                  f"print('ROUTE', find_server().route)\n%tabbi start {repo}",
                                  metadata={"tags": ["setup"]}),
        "%tabbi panel",
        "%tabbi push --cells setup --cells-only -m 'the set-up cell'")
    path = Path(pwd.getpwnam(PERSON).pw_dir) / "chat.ipynb"
    as_user(PERSON, "sh", "-c", f"cat > {path}", input=nbformat.writes(notebook))
    llm.enqueue(Reply(text="I'll create hello.py.", tools=[write("hello.py", "print('hi')\n")]),
                Reply(text="Created **hello.py** through the hub.", chunks=5))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{hub.url}hub/login")
            page.fill("#username_input", PERSON)
            page.fill("#password_input", "any")
            page.click("#login_submit")
            page.wait_for_url(f"**/user/{PERSON}/lab**", timeout=120_000)  # the hub sends dora to her server
            page.goto(f"{hub.url}user/{PERSON}/lab/tree/chat.ipynb")
            # The person's server logs through the hub's output (the spawner's child).
            assert hub.output.wait_for("Connecting to kernel", 120), "JupyterLab connected to no kernel"
            outputs = page.locator(".jp-Cell .jp-OutputArea-output")
            page.locator(".jp-Cell .jp-InputArea-editor").first.click()
            page.keyboard.press("Shift+Enter")
            page.keyboard.press("Shift+Enter")
            expect(outputs.first).to_contain_text("[tabbi] session", timeout=120_000)
            # No TABBI_SERVICE_URL here: the kernel found the hub's service by asking the hub.
            expect(outputs.first).to_contain_text("ROUTE JupyterHub service (probed)")

            panel = page.locator(".tabbi-panel")
            expect(panel.locator(".tb-dot[data-state='running']")).to_be_visible(timeout=120_000)
            box = panel.locator("textarea.tb-input")
            box.click()
            box.fill("create hello.py")
            box.press("Enter")
            expect(panel.locator(".tb-tool.tb-tool-completed")).to_contain_text("write", timeout=120_000)
            expect(panel.locator(".tb-assistant strong")).to_have_text("hello.py", timeout=60_000)
            expect(panel.locator(".tb-assistant").last).to_contain_text("through the hub.")
            expect(panel.locator(".tb-user")).to_have_text("create hello.py")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "hub-panel.png"))

            # Once the turn is over (a push waits for no turn), the set-up cell, pushed from the
            # saved notebook the kernel (as dora) read.
            expect(panel.locator(".tb-state")).to_have_text("Running", timeout=60_000)
            page.locator(".jp-Cell .jp-InputArea-editor").nth(2).click()
            page.keyboard.press("Shift+Enter")
            expect(page.locator(".jp-Cell").nth(2).locator(".jp-OutputArea-output").last).to_contain_text(
                "cells written to: notebooks/chat-setup.py", timeout=120_000)
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "hub-page-failure.png"))
            raise
        finally:
            browser.close()
    branches = as_user(SERVICE, "git", "-C", repo, "branch", "--format=%(refname:short)").split()
    [branch] = [b for b in branches if b != "main"]
    pushed = as_user(SERVICE, "git", "-C", repo, "show", f"{branch}:notebooks/chat-setup.py")
    assert f"# %tabbi start {repo}" in pushed and "print('ROUTE', find_server().route)" in pushed, pushed
    assert "hello.py" not in as_user(SERVICE, "git", "-C", repo, "ls-tree", "--name-only", branch)


LOCAL = """
import os
from tabbi_kernel import client
os.makedirs("mine", exist_ok=True)
try:
    client.connect().start("./mine")
except client.TabbiError as exc:
    print("REFUSED", exc.status, exc)
"""


async def test_a_local_path_in_hub_mode_says_what_to_use_instead(hub):
    """The service (another OS user) cannot read the person's folders: starting from one is
    refused with what to use instead, not with a path the person never heard of."""
    kernel = await hub.kernel(PERSON)
    try:
        out = await kernel.run(LOCAL)
    finally:
        kernel.close()
    assert "REFUSED 400" in out and "git URL" in out and "owner/name" in out, out

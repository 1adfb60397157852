"""JupyterLab and Notebook 7 in headless Chromium (Debian's, driven by Playwright): a person opens a notebook,
starts a session, and chats in the panel; then (light themes) saves the notebook, lets the kernel go,
reopens it and reads the transcript, and re-runs the cells to get the live panel back. Screenshots are
saved to ``test-artifacts/``.

Everything is real but the model: ``jupyter lab`` with tabbi, a real kernel, real OpenCode.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.support.llm import Reply, write
from tests.support.server import JupyterProcess

CHROMIUM = Path("/usr/bin/chromium")
#: Headless Debian Chromium in a container: no sandbox of its own, no GPU, nothing fetched.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
pytestmark = pytest.mark.timeout(300)


THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}
#: (front end, theme): JupyterLab in both themes, and Notebook 7.
VARIANTS = [("lab", "light"), ("lab", "dark"), ("notebook", "light")]
PAGES = {"lab": "lab/tree/chat.ipynb", "notebook": "notebooks/chat.ipynb"}
#: One flow per front end, in the light theme: for browser tests whose subject is not the theme.
ONE_PER_FRONT_END = {"params": [("lab", "light"), ("notebook", "light")], "ids": ["lab", "notebook"]}


def chat_notebook(*cells: str | nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A Python 3 notebook of these code cells (sources, or cells already made)."""
    return nbformat.v4.new_notebook(
        cells=[c if isinstance(c, nbformat.NotebookNode) else nbformat.v4.new_code_cell(c) for c in cells],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})


@contextlib.contextmanager
def chromium_page(name: str, **context_options: Any) -> Iterator[Any]:
    """A page of headless Chromium for one flow (1280x900 unless ``viewport`` says otherwise);
    if the flow fails, the page as it was is saved as ``ARTIFACTS/<name>-failure.png``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        options = {"viewport": {"width": 1280, "height": 900}, **context_options}
        page = browser.new_context(**options).new_page()
        try:
            yield page
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"))
            raise
        finally:
            browser.close()


def run_first_cells(lab: JupyterProcess, page: Any, ui: str, count: int) -> None:
    """Open the chat notebook in front end ``ui`` and run its first ``count`` cells."""
    page.goto(f"{lab.url}{PAGES[ui]}?token={lab.token}")
    lab.wait_kernel_connected()
    page.locator(".jp-Cell .jp-InputArea-editor").first.click()
    for _ in range(count):
        page.keyboard.press("Shift+Enter")


@pytest.fixture(params=VARIANTS, ids=["-".join(v) for v in VARIANTS])
def variant(request) -> tuple[str, str]:
    return request.param


@pytest.fixture
def lab(tmp_path, llm, variant):
    ui, theme = variant
    config = tmp_path / "lab" / "config" / "labconfig"
    config.mkdir(parents=True)
    # The announcements pop-up would cover the page.
    (config / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    settings = tmp_path / "lab" / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "themes.jupyterlab-settings").write_text(json.dumps({"theme": THEMES[theme]}))
    # Only the test's own save writes the notebook (it waits for that save's log line).
    docmanager = tmp_path / "lab" / "settings" / "@jupyterlab" / "docmanager-extension"
    docmanager.mkdir(parents=True)
    (docmanager / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    server = JupyterProcess(llm.url, tmp_path / "lab", app=ui,
                            env={"JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab" / "settings")})
    yield server
    server.stop()


def test_panel_chat_in_the_browser(lab, llm, source_repo, variant):
    ui, theme = variant
    name = f"{ui}-{theme}"
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is part of the set-up (scripts/setup.sh)"
    nbformat.write(chat_notebook(f"%load_ext tabbi_kernel\n%tabbi start {source_repo}", "%tabbi panel"),
                   lab.workdir / "chat.ipynb")
    # The reply carries markup a hostile model or repository could produce: it must show as text.
    hostile = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    llm.enqueue(Reply(text="I'll create hello.py.", tools=[write("hello.py", "print('hi')\n")]),
                Reply(text=f"Created **hello.py** for you. {hostile}", chunks=5))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            run_first_cells(lab, page, ui, 2)
            expect(page.locator(".jp-Cell .jp-OutputArea-output").first).to_contain_text(
                "[tabbi] session", timeout=60_000)

            panel = page.locator(".tabbi-panel")
            expect(panel.locator(".tb-dot[data-state='running']")).to_be_visible(timeout=120_000)
            box = panel.locator("textarea.tb-input")
            box.click()
            box.fill("create hello.py")
            box.press("Enter")

            expect(panel.locator(".tb-tool.tb-tool-completed")).to_contain_text("write", timeout=120_000)
            expect(panel.locator(".tb-assistant strong")).to_have_text("hello.py", timeout=60_000)
            expect(panel.locator(".tb-user")).to_have_text("create hello.py")
            # Streamed parts keep their order: the reply's text, then its tool call.
            expect(panel.locator(".tb-assistant").first.locator(":scope > :first-child")).to_have_text(
                "I'll create hello.py.")
            expect(box).to_have_value("")
            # Threat: script injection through the model's text. It is shown, never run.
            expect(panel.locator(".tb-assistant").last).to_contain_text("<script>window.__pwned=2</script>")
            assert panel.locator(".tb-assistant img, .tb-assistant script").count() == 0
            assert page.evaluate("window.__pwned") is None
            # The turn's footer: its tokens and cost as OpenCode reported them (issue 14 item 5).
            expect(panel.locator(".tb-turn-usage")).to_contain_text(" out tokens · $", timeout=60_000)
            ARTIFACTS.mkdir(exist_ok=True)
            panel.screenshot(path=str(ARTIFACTS / f"panel-{name}.png"))
            page.screenshot(path=str(ARTIFACTS / f"page-{name}.png"))
            if theme == "light":
                page = reopen_without_kernel(lab, browser, page, ui, name)
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)
            if not page.is_closed():
                page.screenshot(path=str(ARTIFACTS / f"page-{name}-failure.png"))
            raise
        finally:
            browser.close()
    assert (ARTIFACTS / f"panel-{name}.png").stat().st_size > 10_000


def reopen_without_kernel(lab: JupyterProcess, browser, page, ui: str, name: str):
    """Save, let the kernel go, reopen: the transcript stands in for the widget (no "model not
    found"); re-running the cells brings the live panel back with the whole conversation."""
    from playwright.sync_api import expect

    started = page.locator(".jp-Cell .jp-OutputArea-output").first.inner_text()
    sid = started.split("[tabbi] session ")[1].split()[0]
    # The transcript output is refreshed at the turn's end, after its cell has finished (hidden
    # while the live panel shows).
    expect(page.locator(".tabbi-panel .tb-state")).to_have_text("Running", timeout=60_000)
    expect(page.locator(".tabbi-transcript")).to_contain_text("Created **hello.py** for you.")
    page.keyboard.press("Escape")
    page.keyboard.press("Control+s")
    assert lab.output.wait_for("Saving file at /chat.ipynb", 60), "the notebook was not saved"
    path = lab.workdir / "chat.ipynb"
    deadline = time.monotonic() + 30
    while "Created **hello.py**" not in path.read_text():  # the save's write follows its log line
        assert time.monotonic() < deadline, "the saved notebook lacks the transcript"
        time.sleep(0.1)
    saved = nbformat.read(path, as_version=4).cells[1].outputs
    assert "application/vnd.jupyter.widget-view+json" in saved[0]["data"]
    assert "create hello.py" in saved[1]["data"]["text/plain"]
    page.close()
    for session in lab.call("GET", "api/sessions"):  # shuts its kernel down
        lab.call("DELETE", f"api/sessions/{session['id']}")

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        live_again(lab, page, ui, name, sid)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / f"reopened-{name}-failure.png"))
        raise
    return page


def live_again(lab: JupyterProcess, page, ui: str, name: str, sid: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{lab.url}{PAGES[ui]}?token={lab.token}")
    transcript = page.locator(".tabbi-transcript")
    expect(transcript).to_be_visible(timeout=60_000)
    expect(transcript).to_contain_text("create hello.py")
    expect(transcript).to_contain_text("Created **hello.py** for you.")
    assert transcript.locator("img, script").count() == 0  # the model's markup is text here too
    # The widget's output settles into "model not found" (a new kernel has no such model): hidden.
    missing = page.locator(".jp-OutputArea-output.jupyter-widgets")
    expect(missing).to_have_count(1, timeout=60_000)
    expect(missing).to_be_hidden()
    expect(page.get_by_text("Error displaying widget")).to_be_hidden()
    page.screenshot(path=str(ARTIFACTS / f"reopened-{name}.png"))

    # Re-running the cells (the first now picks the session up again) reconnects live.
    editor = page.locator(".jp-Cell .jp-InputArea-editor").first
    editor.click()
    page.keyboard.press("Control+a")
    page.keyboard.type(f"%load_ext tabbi_kernel\n%tabbi use {sid}")
    page.keyboard.press("Shift+Enter")
    page.keyboard.press("Shift+Enter")
    panel = page.locator(".tabbi-panel")
    expect(panel.locator(".tb-user")).to_have_text("create hello.py", timeout=60_000)  # the snapshot
    expect(panel.locator(".tb-assistant strong")).to_have_text("hello.py")
    expect(transcript).to_be_hidden()

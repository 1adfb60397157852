"""Context chips in the chat panel, in JupyterLab and Notebook 7 (headless Debian Chromium): a person
adds a data frame from "+ context", sees what it will send (kind, size, the text on hover), has a
typed name refused, removes that chip, and sends; the model receives the frame's schema and
nothing else of the kernel, and the sent prompt shows its attachment as a badge.

Everything is real but the model (the fixtures and the browser set-up are tests/test_browser.py's).
"""

from __future__ import annotations

import json

import nbformat
import pytest

from tests.support.llm import Reply
from tests.test_browser import (  # noqa: F401 (lab: a fixture)
    ARTIFACTS,
    ONE_PER_FRONT_END,
    chat_notebook,
    chromium_page,
    lab,
    run_first_cells,
)

pytestmark = pytest.mark.timeout(300)

MARKER = "MARKER-NOT-ATTACHED-b7c2"


@pytest.fixture(**ONE_PER_FRONT_END)
def variant(request) -> tuple[str, str]:
    """One flow per front end (the themes are test_browser.py's business)."""
    return request.param


def test_context_chips_in_the_browser(lab, llm, source_repo, variant):  # noqa: F811
    ui, _ = variant
    from playwright.sync_api import expect

    notebook = chat_notebook(f"%load_ext tabbi_kernel\n%tabbi start {source_repo}",
                             "import pandas as pd\n"
                             "df_sales = pd.DataFrame({'region': ['north'], 'units_sold': [3]})\n"
                             f"hidden_note = {MARKER!r}",
                             "%tabbi panel")
    nbformat.write(notebook, lab.workdir / "chat.ipynb")
    llm.enqueue(Reply(text="I see units_sold."))

    with chromium_page(f"context-chips-{ui}") as page:
        run_first_cells(lab, page, ui, 3)
        panel = page.locator(".tabbi-panel")
        expect(panel.locator(".tb-dot[data-state='running']")).to_be_visible(timeout=120_000)

        panel.locator(".tb-context-add").click()
        panel.locator(".tb-context-option[data-spec='df_sales']").click()
        chip = panel.locator(".tb-chip[data-spec='df_sales']")
        expect(chip).to_contain_text("df_sales · variable · ", timeout=30_000)
        assert "units_sold: int64" in chip.get_attribute("title")  # what will be sent, on hover
        panel.locator(".tb-context-add").click()
        typed = panel.locator(".tb-context-input")
        typed.fill("no_such_frame")
        typed.press("Enter")
        refused = panel.locator(".tb-chip-error[data-spec='no_such_frame']")
        expect(refused).to_contain_text("no variable 'no_such_frame'", timeout=30_000)
        refused.locator(".tb-chip-remove").click()
        expect(refused).to_have_count(0)

        box = panel.locator("textarea.tb-input")
        box.click()
        box.fill("what columns are there?")
        box.press("Enter")
        expect(panel.locator(".tb-assistant").last).to_contain_text("I see units_sold.", timeout=120_000)
        badge = panel.locator(".tb-user .tb-badge")
        expect(badge).to_have_text("df_sales")
        expect(panel.locator(".tb-user .tb-attached")).to_contain_text("attached:")
        expect(panel.locator(".tb-chip")).to_have_count(0)  # sent chips are cleared
        ARTIFACTS.mkdir(exist_ok=True)
        panel.screenshot(path=str(ARTIFACTS / f"context-chips-{ui}.png"))
    model = json.dumps(llm.agent_requests())
    assert "units_sold: int64" in model and "what columns are there?" in model
    assert MARKER not in model

"""The chat panel's rendering in headless Chromium, in JupyterLab and Notebook 7: the agent's Markdown
(a table, a fenced Python block) renders as formatted text, an attempted script injection in the
same text runs nothing, a code block's Copy puts its code on the clipboard and "Insert as cell"
makes a new cell with exactly that code, and the per-file diff lists files with counts and
collapses. One flow per front end (one server, one notebook): browser tests are slow.

Threat: the agent's text is the attacker's (a prompt injection in the repository can make the model
write anything): a script tag, an event-handler attribute, a ``javascript:`` link, an HTML comment,
a ``</code>`` breaking out of a code block. The panel must show them as text and run none of them.
"""

from __future__ import annotations

import re

import nbformat
import pytest

from tests.support.llm import Reply, write
from tests.test_browser import (  # noqa: F401 (lab: a fixture)
    ARTIFACTS,
    ONE_PER_FRONT_END,
    chat_notebook,
    chromium_page,
    lab,
    run_first_cells,
)

pytestmark = pytest.mark.timeout(300)

CODE = 'def add(a, b):\n    """Sum."""\n    return b + a  # "</code><script>window.__pwned=3</script>"'
REPLY = f"""## Result

| file | change |
|:-----|-------:|
| calc.py | +1 -1 |
| hello.py | **new** |

```python
{CODE}
```

Attempts: <script>window.__pwned=1</script> <img src=x onerror="window.__pwned=2">
[click me](javascript:window.__pwned=4) <!-- <script>window.__pwned=5</script> -->
<a href="javascript:window.__pwned=6" onmouseover="window.__pwned=7">hover</a> and **done**.
"""


@pytest.fixture(**ONE_PER_FRONT_END)
def variant(request) -> tuple[str, str]:
    return request.param


def test_markdown_code_blocks_and_diff_in_the_panel(lab, llm, source_repo, variant):  # noqa: F811
    ui, _ = variant
    from playwright.sync_api import expect

    nbformat.write(chat_notebook(f"%load_ext tabbi_kernel\n%tabbi start {source_repo}", "%tabbi panel"),
                   lab.workdir / "chat.ipynb")
    llm.enqueue(Reply(text="Editing.", tools=[write("calc.py", "def add(a, b):\n    return b + a\n"),
                                              write("hello.py", "print('hi')\n")]),
                Reply(text=REPLY, chunks=12))

    with chromium_page(f"panel-markdown-{ui}", viewport={"width": 1280, "height": 1000},
                      permissions=["clipboard-read", "clipboard-write"]) as page:
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        run_first_cells(lab, page, ui, 2)
        panel = page.locator(".tabbi-panel")
        expect(panel.locator(".tb-dot[data-state='running']")).to_be_visible(timeout=120_000)
        box = panel.locator("textarea.tb-input")
        box.fill("fix add, then summarize")
        box.press("Enter")

        # The Markdown renders as formatted text.
        reply = panel.locator(".tb-assistant .tb-text").last
        expect(reply.locator("h4")).to_have_text("Result", timeout=120_000)
        expect(reply.locator("table th")).to_have_text(["file", "change"])
        expect(reply.locator("table td")).to_have_text(["calc.py", "+1 -1", "hello.py", "new"])
        expect(reply.locator("table td strong")).to_have_text("new")
        block = reply.locator(".tb-codeblock")
        expect(block).to_have_count(1)
        expect(block.locator(".tb-lang")).to_have_text("python")
        expect(block.locator("code")).to_have_text(CODE, use_inner_text=True)
        expect(block.locator(".tb-k").first).to_have_text("def")
        # The injection attempts are text, and nothing of them ran.
        expect(reply).to_contain_text("<script>window.__pwned=1</script>")
        expect(reply).to_contain_text('<img src=x onerror="window.__pwned=2">')
        expect(reply).to_contain_text("[click me](javascript:window.__pwned=4)")
        expect(reply).to_contain_text("<!-- <script>window.__pwned=5</script> -->")
        expect(reply.locator("strong").last).to_have_text("done")
        assert panel.locator("script, img, iframe, [onerror], [onmouseover], [style*='url']").count() == 0
        hrefs = panel.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
        assert all(h.startswith(("https://", "http://")) for h in hrefs), hrefs
        reply.hover()
        assert page.evaluate("window.__pwned") is None and not dialogs

        # Copy puts exactly the code on the clipboard.
        block.locator("button", has_text="Copy").click()
        expect(block.locator("button[data-action='copy']")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == CODE

        # Insert as cell: a new cell right below the panel's, holding exactly that code.
        cells = page.locator(".jp-Notebook .jp-Cell")
        before = cells.count()  # Shift+Enter on the last cell may have added an empty one
        block.locator("button", has_text="Insert as cell").click()
        expect(cells).to_have_count(before + 1)
        expect(cells.nth(2)).to_have_class(re.compile(r"\bjp-CodeCell\b"))
        expect(cells.nth(2).locator(".cm-content")).to_have_text(CODE, use_inner_text=True)

        # The diff: files with status and counts, each collapsible.
        panel.locator(".tb-actions button", has_text="Diff").click()
        files = panel.locator(".tb-extra .tabbi-diff-file")
        expect(files).to_have_count(2, timeout=60_000)
        expect(panel.locator(".tabbi-diff-summary")).to_contain_text("2 file(s) changed")
        calc = files.filter(has_text="calc.py")
        expect(calc.locator(".tabbi-diff-status")).to_have_text("M")
        expect(calc.locator(".tabbi-diff-counts")).to_have_text("+1 \u22121")
        expect(files.filter(has_text="hello.py").locator(".tabbi-diff-counts")).to_have_text("+1 \u22120")
        lines = calc.locator("pre")
        expect(lines).to_contain_text("+    return b + a")
        expect(lines).to_be_visible()
        calc.locator("summary").click()
        expect(lines).to_be_hidden()
        calc.locator("summary").click()
        expect(lines).to_be_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        panel.screenshot(path=str(ARTIFACTS / f"panel-markdown-{ui}.png"))

        assert page.evaluate("window.__pwned") is None and not dialogs

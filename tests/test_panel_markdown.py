"""The panel's Markdown renderer and highlighter, tested under node without a browser
(``tests/js/panel_markdown.test.mjs``: hostile inputs against the tag and attribute allow-lists,
``safeUrl``, what agents write, streamed re-parsing). Run here so the suite (and ``make mutants``)
includes them; the browser half is tests/test_browser_panel.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_markdown_renderer_under_node():
    node = shutil.which("node")
    assert node, "node is part of the set-up (OpenCode needs it)"
    run = subprocess.run([node, "--disable-warning=MODULE_TYPELESS_PACKAGE_JSON", "--test", "tests/js/"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "# fail 0" in run.stdout and "# pass 0" not in run.stdout

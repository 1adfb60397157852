"""``render.diff``: the branch's changes per file (``%tabbi diff`` and the panel's Diff button).

The diff text comes from the agent's workspace: file names and contents are the agent's to choose,
so every piece of it must stay text in the HTML (threat: a file named or filled with markup)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from tabbi_kernel import render

CALC = ("diff --git a/calc.py b/calc.py\nindex 1111111..2222222 100644\n--- a/calc.py\n+++ b/calc.py\n"
        "@@ -1,2 +1,2 @@\n def add(a, b):\n-    return a - b\n+    return a + b\n")
NOTES = ("diff --git a/notes.md b/notes.md\nnew file mode 100644\nindex 0000000..3333333\n--- /dev/null\n"
         "+++ b/notes.md\n@@ -0,0 +1,2 @@\n+<script>alert(1)</script>\n+--- not a header\n")
NB = ('diff --git a/a.ipynb b/a.ipynb\n--- a/a.ipynb\n+++ b/a.ipynb\n@@ -1 +1 @@\n-  "source": ["x = 1"]\n'
      '+  "source": ["x = 2"]\n')


def entry(path: str, status: str, additions: int, deletions: int, **more) -> dict:
    return {"path": path, "status": status, "additions": additions, "deletions": deletions, **more}


class Tags(HTMLParser):
    """The elements of a piece of HTML, with their attributes."""

    def __init__(self, markup: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict]] = []
        self.feed(markup)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.found.append((tag, dict(attrs)))


def files_of(markup: str) -> list[str]:
    return re.findall(r"<details class='tabbi-diff-file'.*?</details>", markup, re.DOTALL)


def test_split_pairs_sections_with_files_in_order_or_by_header():
    files = [entry("calc.py", "modified", 1, 1), entry("notes.md", "added", 2, 0)]
    assert render.split_diff(CALC + NOTES, files) == [CALC, NOTES]
    # a file without a section of its own (counts disagree): matched by header, the other gets ""
    files.append(entry("gone.txt", "deleted", 0, 3))
    assert render.split_diff(CALC + NOTES, files) == [CALC, NOTES, ""]


def test_split_cuts_where_the_server_says_when_the_budget_left_a_file_only_a_note():
    """The server's whole-diff budget ran out at the third file: its part is only a note, with no
    ``diff --git`` line, and a section-by-header split gave that note to the file before it and
    nothing to the file itself. The server says each part's length (``diff_chars``)."""
    cut = "\n# tabbi: the diff of big.txt is cut here\n"
    parts = [CALC, NOTES, cut]
    files = [entry("calc.py", "modified", 1, 1), entry("notes.md", "added", 2, 0),
             entry("big.txt", "added", 9000, 0, truncated=True)]
    text = "".join(parts)
    assert render.split_diff(text, files)[1] == NOTES + cut  # without lengths: the note misplaced
    for f, part in zip(files, parts, strict=True):
        f["diff_chars"] = len(part)
    assert render.split_diff(text, files) == parts
    shown = files_of(render.diff({"diff": text, "files": files, "truncated": True})["text/html"])
    assert "cut here" in shown[2] and "cut here" not in shown[1]
    # lengths that do not add up (not from this server): the headers decide, as before
    files[0]["diff_chars"] += 1
    assert render.split_diff(text, files)[:2] == [CALC, NOTES + cut]


def test_each_file_is_collapsible_with_status_counts_and_coloured_lines():
    files = [entry("calc.py", "modified", 1, 1), entry("notes.md", "added", 2, 0)]
    result = {"diff": CALC + NOTES, "files": files}
    out = render.diff(result)
    markup = out["text/html"]
    calc, notes = files_of(markup)
    assert "<code class='tabbi-diff-path'>calc.py</code>" in calc and ">M<" in calc
    assert "+1</span>" in calc and "&minus;1</span>" in calc
    assert "<code class='tabbi-diff-path'>notes.md</code>" in notes and ">A<" in notes
    assert "2 file(s) changed</strong>" in markup and "+3</span>" in markup and "&minus;1</span>" in markup
    assert " open>" in calc  # few short files start expanded
    # the agent's markup is text; a removed line reading "--- ..." inside a hunk is an addition here
    assert ("script", {}) not in Tags(markup).found
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in notes
    assert '<span style="color:#1a7f37;background:rgba(46,160,67,.12)">+--- not a header</span>' in notes
    assert '<span style="color:#cf222e;background:rgba(248,81,73,.12)">-    return a - b</span>' in calc
    assert "a/calc.py" not in calc and "new file mode 100644" in notes  # what the summary says is left out
    # the plain text stays what it was (nbval compares it in the example notebooks)
    assert out["text/plain"] == f"2 file(s) changed: calc.py (+1 -1), notes.md (+2 -0)\n\n{CALC + NOTES}"


def test_hostile_file_names_stay_text():
    name = "x'><img src=x onerror=alert(1)>.py"
    section = f"diff --git a/{name} b/{name}\n--- a/{name}\n+++ b/{name}\n@@ -0,0 +1 @@\n+x\n"
    markup = render.diff({"diff": section, "files": [entry(name, "modified' onclick='x", 1, 0)]})["text/html"]
    tags = Tags(markup).found
    assert not [t for t, _ in tags if t in ("img", "script")]
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]


def test_a_notebook_shows_its_cell_diff_instead_of_the_json():
    cells = "## modified /cells/0/source:\n-  x = 1\n+  x = 2\n"
    result = {"diff": CALC + NB, "files": [entry("calc.py", "modified", 1, 1),
                                             entry("a.ipynb", "modified", 1, 1, notebook={"text": cells})]}
    calc, nb = files_of(render.diff(result)["text/html"])
    assert "(cell diff)" in nb and "## modified /cells/0/source:" in nb
    assert "&quot;source&quot;" not in nb and "&quot;source&quot;" not in calc
    assert '<span style="color:#1a7f37;background:rgba(46,160,67,.12)">+  x = 2</span>' in nb
    # %tabbi diff's plain text shows the notebook by cell too, the other files as git wrote them
    plain = render.diff(result)["text/plain"]
    assert "--- a.ipynb (cell diff)\n## modified /cells/0/source:" in plain
    assert NB not in plain and CALC in plain


def test_a_notebook_not_readable_by_cell_says_why():
    """The server keeps git's JSON patch for a notebook it could not read by cell (too large,
    invalid, too deep) and says why in ``notebook_note``; the view shows that reason."""
    note = "not shown by cell: larger than 10 MB"
    result = {"diff": NB, "files": [entry("a.ipynb", "modified", 1, 1, notebook_note=note)]}
    (nb,) = files_of(render.diff(result)["text/html"])
    assert note in nb and "cell diff" not in nb


def test_long_diffs_are_bounded_with_a_note(monkeypatch):
    monkeypatch.setattr(render, "MAX_FILE_LINES", 10)
    monkeypatch.setattr(render, "MAX_TOTAL_LINES", 15)
    monkeypatch.setattr(render, "OPEN_LINES", 20)
    body = "".join(f"+line {i}\n" for i in range(50))
    big = [f"diff --git a/f{n}.txt b/f{n}.txt\n@@ -0,0 +1,50 @@\n{body}" for n in range(3)]
    files = [entry(f"f{n}.txt", "added", 50, 0) for n in range(3)]
    first, second, third = files_of(render.diff({"diff": "".join(big), "files": files})["text/html"])
    # 10 lines, the first of them the hunk's @@ line
    assert first.count("+line") == 9 and "41 more line(s) of this file not shown" in first
    assert second.count("+line") == 4 and "46 more line(s)" in second  # what the total leaves
    assert third.count("+line") == 0 and "51 more line(s)" in third
    assert " open>" not in first  # long files start collapsed


def test_skipped_and_omitted_files_say_so():
    result = {"diff": "diff --git a/dump.csv b/dump.csv\n# tabbi: content not shown (5 bytes, over 1)\n",
              "files": [entry("dump.csv", "added", None, None, skipped="5 bytes, over 1", truncated=True)],
              "truncated": True, "omitted_files": 4}
    out = render.diff(result)
    assert "(5 bytes, over 1)" in out["text/html"] and "4 more file(s) not listed" in out["text/html"]
    assert "shortened: too large to show in full" in out["text/html"]
    assert out["text/plain"].startswith("1 file(s) changed: dump.csv (5 bytes, over 1) (shortened")


def test_no_changes():
    assert "No changes" in render.diff({"diff": "", "files": []})["text/plain"]

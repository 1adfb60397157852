"""How tabbi's outputs look in a notebook: every rich output also has a plain-text form, for
frontends (and nbval) that do not render HTML."""

from __future__ import annotations

import html
import itertools
import re
from typing import Any

STATE_COLORS = {"starting": "#d08700", "running": "#1a7f37", "paused": "#8c959f", "error": "#cf222e",
                "idle": "#8c959f"}


def bundle(html_text: str, plain: str) -> dict[str, str]:
    return {"text/html": html_text, "text/plain": plain}


#: Lines of one file's diff shown, and of the whole diff; past them a note says what was left out
#: (the server bounds the text already; this bounds what a browser lays out).
MAX_FILE_LINES = 2000
MAX_TOTAL_LINES = 6000
#: Files start expanded when there are at most this many and their diff is short.
OPEN_FILES = 5
OPEN_LINES = 200
STATUS_MARKS = {"added": "A", "modified": "M", "deleted": "D", "renamed": "R", "copied": "C",
                "type changed": "T"}
LINE_STYLES = (("+", "color:#1a7f37;background:rgba(46,160,67,.12)"),
               ("-", "color:#cf222e;background:rgba(248,81,73,.12)"), ("@@", "color:#8250df"))


def split_diff(text: str, files: list[dict[str, Any]]) -> list[str]:
    """The unified diff cut into one text per entry of ``files``.

    The server writes one part per file, in the order of ``files``, and says each part's length
    (``diff_chars``): cut there. From a server that does not say (an older one), each ``diff
    --git`` section pairs in order when the counts agree (paths git quotes need no parsing), or
    else goes to the file whose ``a/PATH b/PATH`` header it carries, and a file without one gets
    ``""``."""
    lengths = [f.get("diff_chars") for f in files]
    if all(isinstance(n, int) and n >= 0 for n in lengths) and sum(lengths) == len(text):
        ends = list(itertools.accumulate(lengths))
        return [text[end - n:end] for n, end in zip(lengths, ends, strict=True)]
    sections = re.split(r"(?m)^(?=diff --git )", text)
    sections = [s for s in sections if s.startswith("diff --git ")]
    if len(sections) == len(files):
        return sections
    by_header = {s.split("\n", 1)[0]: s for s in sections}
    return [by_header.get(f"diff --git a/{f.get('path')} b/{f.get('path')}", "") for f in files]


def _lines_html(lines: list[str], headers: bool) -> str:
    """Escaped, coloured lines; with ``headers``, what precedes a file's first hunk is its header
    (so a removed line that reads ``--- x`` is still a removed line)."""
    out, in_hunks = [], not headers
    for line in lines:
        escaped = html.escape(line) or " "
        if line.startswith("@@"):
            in_hunks = True
        if not in_hunks or line.startswith("# tabbi:"):
            style = "font-weight:bold"
        else:
            style = next((s for prefix, s in LINE_STYLES if line.startswith(prefix)), "")
        out.append(f'<span style="{style}">{escaped}</span>' if style else escaped)
    return "\n".join(out)


def _without_file_header(lines: list[str]) -> list[str]:
    """A file's diff lines without what its summary line already says (``diff --git``, ``index``,
    ``---``, ``+++``); mode, rename and binary lines stay. The plain text keeps everything."""
    hunk = next((i for i, line in enumerate(lines) if line.startswith("@@")), len(lines))
    redundant = ("diff --git ", "index ", "--- ", "+++ ")
    return [line for line in lines[:hunk] if not line.startswith(redundant)] + lines[hunk:]


def _counts(entry: dict[str, Any]) -> str:
    if entry.get("skipped"):
        return str(entry["skipped"])
    return f"+{entry.get('additions') or 0} -{entry.get('deletions') or 0}"


def _cell_diff(entry: dict[str, Any]) -> str | None:
    """A notebook's cell-level diff (``entry["notebook"]["text"]``, nbdime's), which stands in
    for its JSON patch; None for other files and notebooks that could not be read by cell."""
    notebook = entry.get("notebook")
    text = notebook.get("text") if isinstance(notebook, dict) else None
    return text if isinstance(text, str) else None


def _file_html(entry: dict[str, Any], section: str, budget: int, opened: bool) -> tuple[str, int]:
    """One collapsible file: status, path, counts, then its lines (at most ``budget``)."""
    cell_diff = _cell_diff(entry)
    cells = cell_diff is not None
    lines = cell_diff.splitlines() if cells else _without_file_header(section.splitlines())
    shown = lines[:max(0, min(budget, MAX_FILE_LINES))]
    body = _lines_html(shown, headers=not cells)
    if len(shown) < len(lines):
        more = len(lines) - len(shown)
        body += f"\n<em>… {more} more line(s) of this file not shown</em>"
    if not lines:
        body = "<em>(no text diff)</em>"
    status = str(entry.get("status") or "modified")
    mark = STATUS_MARKS.get(status, "?")
    counts = "" if entry.get("skipped") else (
        f"<span style='color:#1a7f37'>+{int(entry.get('additions') or 0)}</span> "
        f"<span style='color:#cf222e'>&minus;{int(entry.get('deletions') or 0)}</span>")
    notes = [html.escape(str(entry["skipped"]))] if entry.get("skipped") else []
    if cells:
        notes.append("cell diff")
    elif entry.get("notebook_note"):
        notes.append(html.escape(str(entry["notebook_note"])))
    if entry.get("truncated") and not entry.get("skipped"):
        notes.append("shortened")
    note = f" <em class='tabbi-diff-note'>({', '.join(notes)})</em>" if notes else ""
    markup = (f"<details class='tabbi-diff-file' data-status='{html.escape(status, quote=True)}'"
              f"{' open' if opened else ''}><summary style='cursor:pointer'>"
              f"<span class='tabbi-diff-status' title='{html.escape(status, quote=True)}' "
              f"style='font-family:monospace;font-weight:bold'>{mark}</span> "
              f"<code class='tabbi-diff-path'>{html.escape(str(entry.get('path')))}</code> "
              f"<span class='tabbi-diff-counts'>{counts}</span>{note}</summary>"
              f"<pre style='font-size:12px;line-height:1.35;overflow-x:auto;margin:2px 0 6px'>{body}</pre>"
              "</details>")
    return markup, len(shown)


def diff(result: dict[str, Any]) -> dict[str, str]:
    """The branch's changes: a summary line, then one collapsible ``<details>`` per file (both
    JupyterLab and Notebook 7 render it without script) with its status and +/- counts, lines
    coloured, long diffs cut with a note. The plain text is the summary and the raw diff."""
    text = result.get("diff", "")
    files = result.get("files", [])
    if not text.strip() and not files:
        return bundle("<p><em>No changes on this branch yet.</em></p>", "No changes on this branch yet.")
    summary = ", ".join(f"{f['path']} ({_counts(f)})" for f in files)
    if result.get("truncated"):
        summary += " (shortened: too large to show in full)"
    sections = split_diff(text, files)
    opened = len(files) <= OPEN_FILES
    parts, budget = [], MAX_TOTAL_LINES
    for entry, section in zip(files, sections, strict=True):
        markup, used = _file_html(entry, section, budget, opened and section.count("\n") <= OPEN_LINES)
        parts.append(markup)
        budget -= used
    added = sum(int(f.get("additions") or 0) for f in files)
    removed = sum(int(f.get("deletions") or 0) for f in files)
    notes = []
    if result.get("omitted_files"):
        notes.append(f"{int(result['omitted_files'])} more file(s) not listed")
    if result.get("truncated"):
        notes.append("shortened: too large to show in full")
    note = f" <em>({'; '.join(notes)})</em>" if notes else ""
    markup = (f"<div class='tabbi-diff'><div class='tabbi-diff-summary'><strong>{len(files)} file(s) "
              f"changed</strong> <span style='color:#1a7f37'>+{added}</span> "
              f"<span style='color:#cf222e'>&minus;{removed}</span>{note}</div>{''.join(parts)}</div>")
    plain = text  # notebooks by cell in the plain text too, the rest as git wrote it
    if any(_cell_diff(entry) is not None for entry in files):
        plain = "".join(f"--- {entry.get('path')} (cell diff)\n{cell_diff}\n"
                        if (cell_diff := _cell_diff(entry)) is not None else section
                        for entry, section in zip(files, sections, strict=True))
    return bundle(markup, f"{len(files)} file(s) changed: {summary}\n\n{plain}")


def model_name(model: str | None, short: bool = False) -> str:
    """The model a session uses (sessions made before the server recorded the model it
    resolved have none)."""
    return model or ("" if short else "(the server's default)")


def usage(tokens: dict[str, Any] | None, cost: float | None, total: dict[str, Any] | None = None) -> str:
    """Model use in one line: ``1,234 in / 567 out tokens · $0.0123 · session total $0.0456``
    (reasoning and cache tokens only when there are any)."""
    tokens = tokens or {}
    cache = tokens.get("cache") or {}
    extra = [f"{tokens[k]:,} {k}" for k in ("reasoning",) if tokens.get(k)]
    extra += [f"{cache[k]:,} cache {k}" for k in ("read", "write") if cache.get(k)]
    line = f"{tokens.get('input') or 0:,} in / {tokens.get('output') or 0:,} out tokens"
    if extra:
        line += f" ({', '.join(extra)})"
    line += f" · ${cost or 0:.4f}"
    if total is not None:
        line += f" · session total ${total.get('cost') or 0:.4f}"
    return line


def environment(info: dict[str, Any]) -> str:
    """Where a session's environment came from, in one line: ``warm snapshot env-… from 09:12
    UTC, setup.sh 3f2a1c9d0b1e`` (``environments.py`` in the extension)."""
    import time

    source = info.get("source")
    if source in ("warm", "built"):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(info.get("created_at") or 0))
        what = "warm snapshot" if source == "warm" else "built now, saved as warm snapshot"
        text = f"{what} {info.get('snapshot')} from {when}, setup.sh {str(info.get('setup_hash'))[:12]}"
        if source == "warm":
            text += ", in sync with the base branch" if info.get("synced") else ", syncing"
        if info.get("sync_error"):
            text += f" (sync failed: {info['sync_error']})"
        return text
    return "no setup script (cloned)" if source == "none" else str(source or "-")


def sessions(rows: list[dict[str, Any]], current: str | None) -> dict[str, str]:
    if not rows:
        text = "No sessions yet. Start one with %tabbi start REPO"
        return bundle(f"<p>{html.escape(text)}</p>", text)
    cells = [["*" if row["id"] == current else "", row["id"], row["state"], row["repo"],
              row["work_branch"], model_name(row.get("model"), short=True)] for row in rows]
    return _table(["", "id", "state", "repo", "branch", "model"], cells, 2, "tabbi-sessions")


def _model_use(use: dict[str, Any]) -> str:
    """A session's model tokens and cost in a table cell: ``1,234 tokens, $0.0123``."""
    tokens = use.get("tokens") or {}
    cache = tokens.get("cache") or {}
    count = sum(int(tokens.get(k) or 0) for k in ("input", "output", "reasoning"))
    count += sum(int(cache.get(k) or 0) for k in ("read", "write"))
    return f"{count:,} tokens, ${float(use.get('cost') or 0):.4f}"


def admin_sessions(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Every person's sessions, for ``%tabbi admin``: owner, state, age and use."""
    if not rows:
        return bundle("<p>No sessions on this server.</p>", "No sessions on this server.")
    cells = []
    for row in rows:
        use = row.get("usage") or {}
        running = use.get("running_seconds")
        work = "turn" if use.get("busy") else ""
        if use.get("prompts_queued"):
            work += f" +{use['prompts_queued']} queued"
        cells.append([row["owner"], row["id"], row["state"], row["repo"],
                      _duration(use.get("age_seconds")), _duration(running), work.strip(),
                      f"{use.get('snapshots', 0)} ({_size(use.get('snapshot_bytes') or 0)})",
                      _model_use(use)])
    headers = ["owner", "id", "state", "repo", "age", "running", "work", "snapshots", "model use"]
    return _table(headers, cells, 2, "tabbi-admin")


def _table(headers: list[str], rows: list[list[Any]], state_column: int, css: str) -> dict[str, str]:
    """A table with a colored dot before each row's state, and its plain-text form."""
    plain = ["  ".join(h or " " for h in headers)]
    table_rows = []
    for cells in rows:
        plain.append("  ".join(str(c) for c in cells))
        color = STATE_COLORS.get(cells[state_column], "#8c959f")
        cells_html = [html.escape(str(c)) for c in cells]
        cells_html[state_column] = f"<span style='color:{color}'>&#9679;</span> {cells_html[state_column]}"
        table_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells_html) + "</tr>")
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr>"
    return bundle(f"<table class='{css}'>{head}{''.join(table_rows)}</table>", "\n".join(plain))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, hours = seconds / 60, seconds / 3600
    return f"{seconds:.0f}s" if seconds < 60 else f"{minutes:.0f}m" if minutes < 60 else \
        f"{hours:.1f}h" if hours < 48 else f"{hours / 24:.0f}d"


def _size(size: int) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def tool_summary(data: dict[str, Any]) -> str:
    """A tool call in a few words: ``write hello.py``, ``bash pytest -q``."""
    args = data.get("input") or {}
    main = (data.get("title") or args.get("filePath") or args.get("command") or args.get("pattern")
            or args.get("description") or "")
    main = str(main).splitlines()[0][:120] if main else ""
    return f"{data.get('tool')} {main}".rstrip()


def tool_line(data: dict[str, Any]) -> str:
    """One line per finished tool call: ``[tool] write hello.py: completed``."""
    status = data.get("status")
    line = f"[tool] {tool_summary(data)}: {status}"
    if status == "error" and data.get("error"):
        line += f" ({str(data['error']).splitlines()[0][:200]})"
    return line


def _link(url: str, label: str | None = None) -> str:
    """A link that opens in a new tab; only http(s) URLs become links (a server's answer is
    still data, never markup)."""
    safe = html.escape(url, quote=True)
    if not url.startswith(("https://", "http://")):
        return html.escape(label or url)
    return f"<a href='{safe}' target='_blank' rel='noopener noreferrer'>{html.escape(label or url)}</a>"


def login(attempt: dict[str, Any]) -> dict[str, str]:
    status = attempt.get("status")
    if status == "done":
        text = f"Signed in to GitHub as {attempt.get('login')}."
        return bundle(f"<p>&#10003; {html.escape(text)}</p>", text)
    if status == "failed":
        text = f"GitHub sign-in failed: {attempt.get('error')}"
        return bundle(f"<p style='color:#cf222e'>{html.escape(text)}</p>", text)
    url = str(attempt.get("url") or "")
    if attempt.get("flow") == "device":
        code = str(attempt.get("user_code") or "")
        text = f"Open {url} and enter the code {code}. This finishes by itself once you approve."
        markup = (f"<p>Open {_link(url)} and enter the code <code style='font-size:1.3em'>"
                  f"{html.escape(code)}</code>.</p><p><em>This finishes by itself once you approve."
                  "</em></p>")
        return bundle(markup, text)
    text = f"Sign in to GitHub: {url}\nThis finishes by itself once you approve."
    markup = (f"<p>{_link(url, 'Sign in to GitHub')} (opens GitHub in a new tab).</p>"
              "<p><em>This finishes by itself once you approve.</em></p>")
    return bundle(markup, text)


def repos(rows: list[dict[str, Any]], query: str = "") -> dict[str, str]:
    if not rows:
        text = f"No repositories match {query!r}." if query else "No repositories."
        return bundle(f"<p>{html.escape(text)}</p>", text)
    plain = [f"{len(rows)} repositories (newest push first):"]
    table_rows = []
    for row in rows:
        lock = "private" if row.get("private") else "public"
        pushed = str(row.get("pushed_at") or "")[:10]
        plain.append(f"  {row['full_name']}  {lock}  {pushed}  {row.get('description') or ''}".rstrip())
        name = _link(str(row.get("html_url") or ""), row["full_name"]) if row.get("html_url") \
            else html.escape(row["full_name"])
        cells = [name, lock, html.escape(pushed), html.escape(row.get("description") or "")]
        table_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "<tr><th>repository</th><th></th><th>pushed</th><th>description</th></tr>"
    return bundle(f"<p>{len(rows)} repositories (newest push first); start one with "
                  f"<code>%tabbi start OWNER/NAME</code></p><table class='tabbi-repos'>{head}"
                  f"{''.join(table_rows)}</table>", "\n".join(plain))


def push(result: dict[str, Any]) -> dict[str, str]:
    commit = str(result.get("commit") or "")[:10]
    what = "committed and pushed" if result.get("committed") else "pushed (nothing new to commit)"
    plain = [f"{what} {commit} to {result.get('remote')} branch {result.get('branch')}"]
    markup = [f"<p>&#10003; {html.escape(plain[0])}</p><ul>"]
    pull = result.get("pull_request")
    if pull:
        label = f"pull request #{pull['number']}" + ("" if pull.get("created") else " (already open)")
        plain.append(f"  {label}: {pull['url']}")
    for name, url in (result.get("links") or {}).items():
        if name == "remote":
            continue
        label = {"pull_request": "pull request", "branch": "branch", "commit": "commit"}.get(name, name)
        if name != "pull_request":
            plain.append(f"  {label}: {url}")
        markup.append(f"<li>{html.escape(label)}: {_link(str(url))}</li>")
    if result.get("files"):
        plain.append(f"  cells written to: {', '.join(result['files'])}")
        markup.append(f"<li>cells written to: {html.escape(', '.join(result['files']))}</li>")
    markup.append("</ul>")
    return bundle("".join(markup), "\n".join(plain))

"""How tabbi's outputs look in a notebook: every rich output also has a plain-text form, for
frontends (and nbval) that do not render HTML."""

from __future__ import annotations

import html
from typing import Any

STATE_COLORS = {"starting": "#d08700", "running": "#1a7f37", "paused": "#8c959f", "error": "#cf222e",
                "idle": "#8c959f"}


def bundle(html_text: str, plain: str) -> dict[str, str]:
    return {"text/html": html_text, "text/plain": plain}


def diff(result: dict[str, Any]) -> dict[str, str]:
    text = result.get("diff", "")
    files = result.get("files", [])
    if not text.strip():
        return bundle("<p><em>No changes on this branch yet.</em></p>", "No changes on this branch yet.")
    summary = ", ".join(f"{f['path']} (+{f['additions']} -{f['deletions']})" for f in files)
    lines = []
    for line in text.splitlines():
        style = ""
        if line.startswith("+") and not line.startswith("+++"):
            style = "color:#1a7f37;background:rgba(46,160,67,.12)"
        elif line.startswith("-") and not line.startswith("---"):
            style = "color:#cf222e;background:rgba(248,81,73,.12)"
        elif line.startswith("@@"):
            style = "color:#8250df"
        elif line.startswith(("diff --git", "+++", "---", "new file", "index ")):
            style = "font-weight:bold"
        escaped = html.escape(line) or " "
        lines.append(f'<span style="{style}">{escaped}</span>' if style else escaped)
    body = "\n".join(lines)
    markup = (f"<div class='tabbi-diff'><div><strong>{len(files)} file(s) changed:</strong> "
              f"{html.escape(summary)}</div><pre style='font-size:12px;line-height:1.35;"
              f"overflow-x:auto'>{body}</pre></div>")
    return bundle(markup, f"{len(files)} file(s) changed: {summary}\n\n{text}")


def sessions(rows: list[dict[str, Any]], current: str | None) -> dict[str, str]:
    if not rows:
        text = "No sessions yet. Start one with %tabbi start REPO"
        return bundle(f"<p>{html.escape(text)}</p>", text)
    headers = ["", "id", "state", "repo", "branch", "model"]
    table_rows = []
    plain = ["  ".join(h or " " for h in headers)]
    for row in rows:
        mark = "*" if row["id"] == current else ""
        cells = [mark, row["id"], row["state"], row["repo"], row["work_branch"], row.get("model") or ""]
        plain.append("  ".join(str(c) for c in cells))
        color = STATE_COLORS.get(row["state"], "#8c959f")
        cells_html = [html.escape(str(c)) for c in cells]
        cells_html[2] = f"<span style='color:{color}'>&#9679;</span> {cells_html[2]}"
        table_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells_html) + "</tr>")
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in headers) + "</tr>"
    return bundle(f"<table class='tabbi-sessions'>{head}{''.join(table_rows)}</table>", "\n".join(plain))


def tool_line(data: dict[str, Any]) -> str:
    """One line per finished tool call: ``[tool] write hello.py: completed``."""
    args = data.get("input") or {}
    main = (data.get("title") or args.get("filePath") or args.get("command") or args.get("pattern")
            or args.get("description") or "")
    main = str(main).splitlines()[0][:120] if main else ""
    status = data.get("status")
    line = f"[tool] {data.get('tool')} {main}".rstrip() + f": {status}"
    if status == "error" and data.get("error"):
        line += f" ({str(data['error']).splitlines()[0][:200]})"
    return line

// tabbi chat panel: renders the traitlets of tabbi_kernel.panel.ChatPanel, sends actions back.
// No build step, no dependencies. Everything from the model or the repository is treated as text:
// Markdown is rendered by escaping first and adding only our own tags, so no HTML or script
// injected by a model or a repository can run here.

const STATES = {
  starting: ["#d08700", "Starting"],
  running: ["#1a7f37", "Running"],
  paused: ["#8c959f", "Paused"],
  error: ["#cf222e", "Error"],
  idle: ["#8c959f", "Idle"],
};

const PY_KEYWORDS = new Set(
  ("False None True and as assert async await break class continue def del elif else except " +
   "finally for from global if import in is lambda nonlocal not or pass raise return try while " +
   "with yield print self").split(" "),
);

export function escapeHtml(text) {
  return String(text)
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

// Highlight escaped code: comments, strings, numbers and Python keywords.
function highlight(code, lang) {
  const escaped = escapeHtml(code);
  if (lang && !["python", "py", "python3", "ipython", ""].includes(lang)) return escaped;
  const token = /(#[^\n]*)|(&quot;.*?&quot;|&#39;.*?&#39;)|\b(\d+(?:\.\d+)?)\b|\b([A-Za-z_][A-Za-z0-9_]*)\b/g;
  return escaped.replace(token, (m, comment, str, num, word) => {
    if (comment) return `<span class="tb-c">${comment}</span>`;
    if (str) return `<span class="tb-s">${str}</span>`;
    if (num) return `<span class="tb-n">${num}</span>`;
    if (word && PY_KEYWORDS.has(word)) return `<span class="tb-k">${word}</span>`;
    return m;
  });
}

function inline(escaped) {
  return escaped
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[\s(])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g,
      '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
}

// A small, safe Markdown subset: fenced code, headings, lists, quotes, paragraphs, inline marks.
export function renderMarkdown(text) {
  const out = [];
  const parts = String(text).split(/```/);
  parts.forEach((chunk, i) => {
    if (i % 2 === 1) {
      const newline = chunk.indexOf("\n");
      const lang = newline >= 0 ? chunk.slice(0, newline).trim().toLowerCase() : "";
      const code = newline >= 0 ? chunk.slice(newline + 1) : chunk;
      out.push(`<pre class="tb-code"><code>${highlight(code.replace(/\n$/, ""), lang)}</code></pre>`);
      return;
    }
    let list = null;
    const closeList = () => { if (list) { out.push(`</${list}>`); list = null; } };
    let para = [];
    const closePara = () => { if (para.length) { out.push(`<p>${para.join("<br>")}</p>`); para = []; } };
    for (const raw of chunk.split("\n")) {
      const line = inline(escapeHtml(raw));
      let m;
      if (!raw.trim()) { closePara(); closeList(); continue; }
      if ((m = raw.match(/^(#{1,4})\s+(.*)$/))) {
        closePara(); closeList();
        out.push(`<h${m[1].length + 2}>${inline(escapeHtml(m[2]))}</h${m[1].length + 2}>`);
      } else if ((m = raw.match(/^\s*[-*]\s+(.*)$/))) {
        closePara();
        if (list !== "ul") { closeList(); out.push("<ul>"); list = "ul"; }
        out.push(`<li>${inline(escapeHtml(m[1]))}</li>`);
      } else if ((m = raw.match(/^\s*\d+[.)]\s+(.*)$/))) {
        closePara();
        if (list !== "ol") { closeList(); out.push("<ol>"); list = "ol"; }
        out.push(`<li>${inline(escapeHtml(m[1]))}</li>`);
      } else if ((m = raw.match(/^>\s?(.*)$/))) {
        closePara(); closeList();
        out.push(`<blockquote>${inline(escapeHtml(m[1]))}</blockquote>`);
      } else {
        closeList();
        para.push(line);
      }
    }
    closePara(); closeList();
  });
  return out.join("");
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function mainArgument(part) {
  const input = part.input || {};
  const value = part.title || input.filePath || input.command || input.pattern || input.path || "";
  return String(value).split("\n")[0].slice(0, 80);
}

const TOOL_ICONS = { pending: "…", running: "⟳", completed: "✓", error: "✗" };

function toolChip(part, openTools) {
  const status = part.status || "pending";
  const details = el("details", { class: `tb-tool tb-tool-${status}`, "data-part": part.id });
  if (openTools.has(part.id)) details.open = true;
  details.addEventListener("toggle", () => {
    if (details.open) openTools.add(part.id); else openTools.delete(part.id);
  });
  details.append(el("summary", {},
    el("span", { class: "tb-tool-icon" }, TOOL_ICONS[status] || "•"),
    el("span", { class: "tb-tool-name" }, part.tool || "tool"),
    el("span", { class: "tb-tool-arg" }, mainArgument(part)),
    el("span", { class: "tb-tool-status" }, status)));
  const body = el("div", { class: "tb-tool-body" });
  if (part.input && Object.keys(part.input).length) {
    body.append(el("div", { class: "tb-label" }, "input"), el("pre", {}, JSON.stringify(part.input, null, 2)));
  }
  if (part.output) body.append(el("div", { class: "tb-label" }, "output"), el("pre", {}, part.output));
  if (part.error) body.append(el("div", { class: "tb-label" }, "error"), el("pre", { class: "tb-err" }, part.error));
  details.append(body);
  return details;
}

function renderMessage(message, openTools) {
  const box = el("div", { class: `tb-msg tb-${message.role}` });
  for (const part of message.parts || []) {
    if (part.type === "text" && part.text) {
      const div = el("div", { class: "tb-text" });
      if (message.role === "user") div.textContent = part.text;
      else div.innerHTML = renderMarkdown(part.text); // escaped by renderMarkdown
      box.append(div);
    } else if (part.type === "tool") {
      box.append(toolChip(part, openTools));
    } else if (part.type === "patch" && (part.files || []).length) {
      box.append(el("div", { class: "tb-files" }, `changed: ${part.files.join(", ")}`));
    }
  }
  return box.childNodes.length ? box : null;
}

function permissionCard(model, request) {
  const meta = request.metadata || {};
  const what = (request.patterns || []).join(", ") || meta.filepath || "";
  const card = el("div", { class: "tb-permission" },
    el("div", { class: "tb-permission-title" }, `The agent asks to ${request.permission}: ${what}`));
  const detail = meta.diff || meta.command || "";
  if (detail) card.append(el("pre", {}, detail));
  const answer = (reply) => () => model.send({ type: "permission", id: request.permission_id, reply });
  card.append(el("div", { class: "tb-actions" },
    el("button", { class: "tb-btn tb-primary", onclick: answer("once") }, "Allow once"),
    el("button", { class: "tb-btn", onclick: answer("always") }, "Always"),
    el("button", { class: "tb-btn tb-danger", onclick: answer("reject") }, "Reject")));
  return card;
}

function render({ model, el: root }) {
  const openTools = new Set();
  const status = el("div", { class: "tb-status" });
  const log = el("div", { class: "tb-log", role: "log", "aria-live": "polite" });
  const permissions = el("div", { class: "tb-permissions" });
  const notice = el("div", { class: "tb-notice" });
  const turnError = el("div", { class: "tb-error tb-turn-error" });
  const pushed = el("div", { class: "tb-pushed" });
  const extra = el("div", { class: "tb-extra" });
  const input = el("textarea", {
    class: "tb-input", rows: "2",
    placeholder: "Ask the agent… (Enter sends, Shift+Enter for a new line)",
  });
  const send = () => {
    const text = input.value;
    if (!text.trim()) return;
    model.send({ type: "send", text });
    input.value = "";
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      event.stopPropagation(); // keep JupyterLab's own Enter/Shift+Enter shortcuts out of it
      send();
    }
  });
  const abort = el("button", { class: "tb-btn tb-danger", onclick: () => model.send({ type: "abort" }) }, "Abort");
  const pause = el("button", {
    class: "tb-btn",
    onclick: () => model.send({ type: model.get("state") === "paused" ? "resume" : "pause" }),
  }, "Pause");
  const insert = el("button", { class: "tb-btn", onclick: () => model.send({ type: "insert" }) }, "Insert code");
  const diff = el("button", { class: "tb-btn", onclick: () => model.send({ type: "diff" }) }, "Diff");
  const sendButton = el("button", { class: "tb-btn tb-primary", onclick: send }, "Send");
  const pushMessage = el("input", { class: "tb-push-message", type: "text", placeholder: "Commit message (optional)" });
  const pushPr = el("input", { type: "checkbox", class: "tb-push-pr" });
  const pushGo = el("button", {
    class: "tb-btn tb-primary",
    onclick: () => model.send({ type: "push", message: pushMessage.value, pr: pushPr.checked }),
  }, "Commit and push");
  const pushForm = el("div", { class: "tb-push-form", hidden: "" },
    pushMessage, el("label", {}, pushPr, " open a pull request"), pushGo);
  const push = el("button", { class: "tb-btn", onclick: () => { pushForm.hidden = !pushForm.hidden; } }, "Push…");
  root.classList.add("tabbi-panel");
  root.append(status, log, permissions, turnError, notice, pushed, extra,
    el("div", { class: "tb-compose" }, input, sendButton),
    el("div", { class: "tb-actions" }, abort, pause, insert, diff, push), pushForm);

  const drawStatus = () => {
    const state = model.get("state");
    const [color, word] = STATES[state] || ["#8c959f", state];
    const busy = model.get("busy") && state === "running" ? " · working" : "";
    const phase = state === "starting" && model.get("phase") ? ` · ${model.get("phase").replace(/_/g, " ")}` : "";
    status.replaceChildren(
      el("span", { class: "tb-dot", style: `background:${color}`, "data-state": state }),
      el("span", { class: "tb-state" }, word + phase + busy),
      el("span", { class: "tb-repo" }, `${model.get("repo")} · ${model.get("branch")}`));
    if (!model.get("connected")) status.append(el("span", { class: "tb-offline" }, "reconnecting…"));
    if (state === "error" && model.get("error")) status.append(el("div", { class: "tb-error" }, model.get("error")));
    abort.disabled = !model.get("busy");
    pause.textContent = state === "paused" ? "Resume" : "Pause";
  };
  const drawLog = () => {
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.replaceChildren(...(model.get("messages") || []).map((m) => renderMessage(m, openTools)).filter(Boolean));
    if (atBottom) log.scrollTop = log.scrollHeight;
  };
  const drawPermissions = () => {
    permissions.replaceChildren(...(model.get("permissions") || []).map((p) => permissionCard(model, p)));
  };
  const drawNotice = () => { notice.textContent = model.get("notice") || ""; };
  const drawTurnError = () => {
    const error = model.get("turn_error");
    turnError.textContent = error ? `The last turn ended with an error: ${error}` : "";
  };
  const drawPushed = () => {
    const data = model.get("pushed") || {};
    pushed.replaceChildren();
    if (!data.commit) return;
    pushed.append(`Pushed ${String(data.commit).slice(0, 10)} to ${data.branch}`);
    const links = data.links || {};
    for (const [name, url] of Object.entries(links)) {
      if (!/^https?:\/\//.test(String(url))) continue; // a server's answer is data: only http(s) links
      pushed.append(" · ", el("a", { href: String(url), target: "_blank", rel: "noopener noreferrer" },
        name.replace(/_/g, " ")));
    }
  };
  const drawPushing = () => { pushGo.disabled = model.get("pushing"); };
  const drawExtra = () => {
    extra.replaceChildren();
    const code = model.get("code");
    if (code) {
      const copy = el("button", { class: "tb-btn", onclick: () => navigator.clipboard?.writeText(code) }, "Copy");
      extra.append(el("div", { class: "tb-codebox" }, copy, el("pre", { class: "tb-code" }, code)));
    }
    const diffHtml = model.get("diff_html");
    if (diffHtml) {
      const box = el("div", { class: "tb-diff" });
      box.innerHTML = diffHtml; // produced by tabbi_kernel.render.diff, which escapes every line
      extra.append(box);
    }
  };
  drawStatus(); drawLog(); drawPermissions(); drawNotice(); drawExtra(); drawTurnError(); drawPushed(); drawPushing();
  for (const name of ["state", "phase", "error", "busy", "connected"]) model.on(`change:${name}`, drawStatus);
  model.on("change:messages", drawLog);
  model.on("change:permissions", drawPermissions);
  model.on("change:notice", drawNotice);
  model.on("change:turn_error", drawTurnError);
  model.on("change:pushed", drawPushed);
  model.on("change:pushing", drawPushing);
  model.on("change:code", drawExtra);
  model.on("change:diff_html", drawExtra);
}

export default { render };

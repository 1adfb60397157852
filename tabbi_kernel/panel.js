// tabbi chat panel: the front end of tabbi_kernel.panel.ChatPanel.
// The conversation arrives as small operations (custom widget messages: "ops"), applied to one copy
// per widget model in this page (the store) and to each view's DOM in place; a model that joins late
// asks for one "snapshot". Coarse state (status, permissions, notices) comes as traitlets.
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


const OUTCOME_LABELS = { aborted: "Turn aborted", error: "Turn ended with an error" };

// -- the page-wide copy of a widget model's conversation ----------------------------------------
const stores = new Map(); // model key -> store

function newStore() {
  return {
    synced: false, seq: -1, nonce: Math.random().toString(36).slice(2),
    messages: [], byId: new Map(), turns: new Map(),
    views: new Set(), openTools: new Set(), draft: "",
  };
}

function storeFor(model) {
  const key = model.get("key");
  if (!stores.has(key)) stores.set(key, newStore());
  return stores.get(key);
}

function ensureMessage(store, id, role = "assistant", turn = null) {
  let message = store.byId.get(id);
  if (!message) {
    message = { id, role, turn, parts: [] };
    store.byId.set(id, message);
    store.messages.push(message);
  }
  return message;
}

function ensurePart(message, id, type) {
  let part = message.parts.find((p) => p.id === id);
  if (!part) { part = { id, type }; message.parts.push(part); }
  return part;
}

// Apply one operation to the store; returns what changed, for the views.
function applyOp(store, op) {
  if (op.op === "message") {
    const message = ensureMessage(store, op.message.id, op.message.role, op.message.turn);
    if (op.message.attachments) message.attachments = op.message.attachments;
    return { message };
  }
  if (op.op === "append") {
    const message = ensureMessage(store, op.message);
    const part = ensurePart(message, op.part, op.kind);
    part.text = (part.text || "") + op.text;
    return { message, part };
  }
  if (op.op === "part") {
    const message = ensureMessage(store, op.message);
    const part = ensurePart(message, op.part.id, op.part.type);
    for (const key of Object.keys(part)) delete part[key];
    Object.assign(part, op.part);
    return { message, part };
  }
  if (op.op === "turn") {
    store.turns.set(op.turn.prompt_id, op.turn);
    return { turn: op.turn };
  }
  return {};
}

function onCustom(store, msg) {
  if (msg.type === "snapshot") {
    if (store.synced && msg.nonce !== store.nonce) return; // another model's request: we are current
    store.messages = msg.messages || [];
    store.byId = new Map(store.messages.map((m) => [m.id, m]));
    store.turns = new Map((msg.turns || []).map((t) => [t.prompt_id, t]));
    store.seq = msg.seq;
    store.synced = true;
    for (const view of store.views) view.redraw();
  } else if (msg.type === "ops") {
    if (!store.synced || msg.seq <= store.seq) return; // the snapshot already holds it
    store.seq = msg.seq;
    const changes = msg.ops.map((op) => applyOp(store, op));
    for (const view of store.views) view.apply(changes);
  }
}

// The notebook keeps the transcript output (see tabbi_kernel/panel.py); JupyterLab and Notebook 7
// ignore display updates after the displaying cell has finished, so write it into the notebook's
// output models here, found by their metadata. Where there is no notebook (a console), nothing.
function saveTranscript(model, msg) {
  const cells = model.widget_manager?.context?.model?.cells;
  if (!cells) return;
  for (const cell of cells) {
    const outputs = cell.type === "code" ? cell.outputs : null;
    for (let i = 0; outputs && i < outputs.length; i++) {
      const metadata = outputs.get(i).metadata || {};
      if (metadata.tabbi?.transcript === msg.key) {
        outputs.set(i, { output_type: "display_data", data: msg.bundle, metadata });
      }
    }
  }
}

function initialize({ model }) {
  const store = storeFor(model);
  const handler = (msg) => (msg.type === "transcript" ? saveTranscript(model, msg) : onCustom(store, msg));
  model.on("msg:custom", handler);
  model.send({ type: "sync", nonce: store.nonce });
  return () => { model.off("msg:custom", handler); stores.delete(model.get("key")); };
}

// -- drawing ------------------------------------------------------------------------------------
function drawPart(message, part, openTools) {
  if (part.type === "text" && part.text) {
    const div = el("div", { class: "tb-text", "data-part": part.id });
    if (message.role === "user") div.append(part.text, attachmentBadges(message));
    else div.innerHTML = renderMarkdown(part.text); // escaped by renderMarkdown
    return div;
  }
  if (part.type === "tool") return toolChip(part, openTools);
  if (part.type === "patch" && (part.files || []).length) {
    return el("div", { class: "tb-files", "data-part": part.id }, `changed: ${part.files.join(", ")}`);
  }
  return el("div", { class: "tb-empty", "data-part": part.id, hidden: "" });
}

function turnLabel(turn) {
  const word = OUTCOME_LABELS[turn.outcome];
  const usage = turnUsage(turn);
  if (!word && !usage) return null;
  return el("div", { class: `tb-turn-end tb-turn-${turn.outcome}`, "data-turn": turn.prompt_id },
    word ? (turn.outcome === "error" && turn.error ? `${word}: ${turn.error}` : word) : null, usage);
}

// The turn's footer: its tokens and cost as OpenCode reported them, and the session's total.
function turnUsage(turn) {
  const usage = turn.usage;
  if (!usage || !usage.tokens) return null;
  const n = (value) => Number(value || 0).toLocaleString("en-US");
  const dollars = (value) => `$${Number(value || 0).toFixed(4)}`;
  const total = usage.session ? ` · session total ${dollars(usage.session.cost)}` : "";
  return el("span", { class: "tb-turn-usage" },
    `${n(usage.tokens.input)} in / ${n(usage.tokens.output)} out tokens · ${dollars(usage.cost)}${total}`);
}

// One view of the log: the DOM of each message and part, changed in place by operations.
function logView(store, log) {
  const boxes = new Map(); // message id -> { box, parts: Map(part id -> node) }
  const dirty = new Map(); // part node waiting for the next frame -> [message, part]
  let frame = 0;

  const stick = (change) => {
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    change();
    if (atBottom) log.scrollTop = log.scrollHeight;
  };
  const boxFor = (message) => {
    let entry = boxes.get(message.id);
    if (!entry) {
      const box = el("div", { class: `tb-msg tb-${message.role}`, "data-message": message.id,
        "data-turn": message.turn || "" });
      entry = { box, parts: new Map() };
      boxes.set(message.id, entry);
      log.append(box);
    }
    return entry;
  };
  const putPart = (message, part) => {
    const entry = boxFor(message);
    const node = drawPart(message, part, store.openTools);
    const old = entry.parts.get(part.id);
    if (old) old.replaceWith(node); else entry.box.append(node);
    entry.parts.set(part.id, node);
  };
  const putLabel = (turn) => {
    log.querySelector(`.tb-turn-end[data-turn="${CSS.escape(turn.prompt_id)}"]`)?.remove();
    const label = turnLabel(turn);
    if (!label) return;
    const mine = log.querySelectorAll(`.tb-msg[data-turn="${CSS.escape(turn.prompt_id)}"]`);
    if (mine.length) mine[mine.length - 1].after(label); else log.append(label);
  };
  // Streamed text re-renders its own part at most once a frame: the cost follows the part being
  // written, never the conversation.
  const flushDirty = () => {
    frame = 0;
    stick(() => { for (const [message, part] of dirty.values()) putPart(message, part); });
    dirty.clear();
  };
  return {
    redraw() {
      boxes.clear(); dirty.clear();
      log.replaceChildren();
      for (const message of store.messages) {
        boxFor(message);
        for (const part of message.parts || []) putPart(message, part);
      }
      for (const turn of store.turns.values()) putLabel(turn);
      log.scrollTop = log.scrollHeight;
    },
    apply(changes) {
      stick(() => {
        for (const { message, part, turn } of changes) {
          if (turn) putLabel(turn);
          else if (part && part.type === "text" && boxes.get(message.id)?.parts.has(part.id)) {
            dirty.set(`${message.id}/${part.id}`, [message, part]); // a new part is placed at once, in order
          }
          else if (part) putPart(message, part);
          else if (message) boxFor(message);
        }
      });
      if (dirty.size && !frame) frame = requestAnimationFrame(flushDirty);
    },
  };
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

// -- context chips: what goes with the next prompt (tabbi_kernel/context.py gathers it) ----------
function humanBytes(n) {
  return n < 1000 ? `${n} B` : n < 1e6 ? `${(n / 1000).toFixed(1)} KB` : `${(n / 1e6).toFixed(1)} MB`;
}

// What a sent prompt carried: one badge per attachment (kind, size, cut or not), never the content.
function attachmentBadges(message) {
  const box = el("div", { class: "tb-attached" });
  if ((message.attachments || []).length) box.append(el("span", { class: "tb-attached-label" }, "attached:"));
  for (const a of message.attachments || []) {
    box.append(el("span", { class: "tb-badge", "data-kind": a.kind, title: `${a.kind}, ${humanBytes(a.bytes || 0)}` +
      (a.truncated ? ", truncated" : "") }, `${a.label}${a.truncated ? " (truncated)" : ""}`));
  }
  return box;
}

// The composer's chips: "+ context" offers the kernel's data frames and arrays, @error and @cells,
// or takes a typed name (df, @cell:3, @file:PATH). Each chip shows kind and size once the kernel
// has gathered it, its text on hover or click, and is removable; only chips that gathered go.
function contextChips(model) {
  const chips = new Map(); // spec -> { node, ok }
  const row = el("div", { class: "tb-chips" });
  const menu = el("div", { class: "tb-context-menu", hidden: "" });
  const typed = el("input", { class: "tb-context-input", type: "text", placeholder: "df, @cell:3, @error, @file:PATH" });
  const add = (spec) => {
    spec = spec.trim();
    if (!spec || chips.has(spec)) return;
    const node = el("span", { class: "tb-chip tb-chip-loading", "data-spec": spec }, spec);
    chips.set(spec, { node, ok: false });
    row.insertBefore(node, plus);
    model.send({ type: "context_preview", spec });
    menu.hidden = true;
  };
  const plus = el("button", { class: "tb-btn tb-context-add", onclick: () => {
    menu.hidden = !menu.hidden;
    if (!menu.hidden) model.send({ type: "context_options" });
  } }, "+ context");
  typed.addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault(); event.stopPropagation();
    add(typed.value); typed.value = "";
  });
  const remove = (spec) => { chips.get(spec)?.node.remove(); chips.delete(spec); };
  const drawChip = (msg) => {
    const chip = chips.get(msg.spec);
    if (!chip) return;
    const close = el("button", { class: "tb-chip-remove", title: "remove", onclick: () => remove(msg.spec) }, "×");
    const node = msg.error
      ? el("span", { class: "tb-chip tb-chip-error", "data-spec": msg.spec, title: msg.error }, `${msg.spec}: ${msg.error}`, close)
      : el("span", { class: "tb-chip", "data-spec": msg.spec, "data-kind": msg.kind, title: msg.preview },
        el("span", { class: "tb-chip-label", onclick: () => node.classList.toggle("tb-chip-open") },
          `${msg.label} · ${msg.kind} · ${humanBytes(msg.bytes)}${msg.truncated ? " · truncated" : ""}`),
        close, el("pre", { class: "tb-chip-preview" }, msg.preview));
    chip.node.replaceWith(node);
    chips.set(msg.spec, { node, ok: !msg.error });
  };
  const onMessage = (msg) => {
    if (msg.type === "context_preview") drawChip(msg);
    else if (msg.type === "context_options") {
      menu.replaceChildren(...(msg.options || []).map((o) => el("button", {
        class: "tb-btn tb-context-option", "data-spec": o.spec, onclick: () => add(o.spec) }, `${o.spec} — ${o.what}`)),
      typed);
    }
  };
  model.on("msg:custom", onMessage);
  row.append(plus);
  return {
    node: el("div", { class: "tb-context" }, row, menu),
    specs: () => [...chips.entries()].filter(([, c]) => c.ok).map(([spec]) => spec),
    clear: () => { for (const spec of [...chips.keys()]) remove(spec); },
    dispose: () => model.off("msg:custom", onMessage),
  };
}

function render({ model, el: root }) {
  const store = storeFor(model);
  const status = el("div", { class: "tb-status" });
  const waiting = el("div", { class: "tb-waiting", hidden: "" });
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
  input.value = store.draft; // a re-rendered output keeps what was being typed
  input.addEventListener("input", () => { store.draft = input.value; });
  const send = () => {
    const text = input.value;
    if (!text.trim()) return;
    model.send({ type: "send", text, attach: context.specs() });
    input.value = store.draft = "";
    context.clear();
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
  const context = contextChips(model);
  root.classList.add("tabbi-panel");
  root.append(status, log, waiting, permissions, turnError, notice, pushed, extra, context.node,
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
    drawWaiting();
  };
  // "waiting for the model…" with the time since: as the server says (turn.waiting), or, from a
  // server that does not say, while a started turn has nothing of the agent's reply yet.
  const currentTurn = () => [...store.turns.values()].reverse().find((t) => !t.outcome) || null;
  const waitingSince = () => {
    if (!model.get("busy")) return undefined;
    if (model.get("waiting_signal")) return model.get("waiting_since") ?? undefined;
    const turn = currentTurn();
    const replied = turn && store.messages.some((m) => m.turn === turn.prompt_id && m.role === "assistant" &&
      (m.parts || []).some((p) => p.type !== "text" || p.text));
    return !turn || replied ? undefined : (turn.started_at ?? null);
  };
  const drawWaiting = () => {
    const since = waitingSince();
    if (since === undefined) { waiting.hidden = true; return; }
    const seconds = since === null ? null : Math.max(0, Math.round(Date.now() / 1000 - since));
    const retry = model.get("retry");
    waiting.hidden = false;
    waiting.textContent = `waiting for the model…${seconds === null ? "" : ` ${seconds} s`}` +
      (retry ? ` (retrying: ${retry})` : "");
  };
  const ticker = setInterval(drawWaiting, 1000);
  const logDraw = logView(store, log);
  const view = {
    redraw: () => { logDraw.redraw(); drawWaiting(); },
    apply: (changes) => { logDraw.apply(changes); drawWaiting(); },
  };
  store.views.add(view);
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
    pushed.append(`${data.committed ? "Committed and pushed" : "Pushed"} ${String(data.commit).slice(0, 10)} to ${data.branch}`);
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
  view.redraw();
  drawStatus(); drawPermissions(); drawNotice(); drawExtra(); drawTurnError(); drawPushed(); drawPushing();
  const listeners = [
    [["state", "phase", "error", "busy", "connected", "retry", "waiting_since", "waiting_signal"], drawStatus],
    [["permissions"], drawPermissions], [["notice"], drawNotice], [["turn_error"], drawTurnError],
    [["pushed"], drawPushed], [["pushing"], drawPushing], [["code", "diff_html"], drawExtra],
  ];
  for (const [names, draw] of listeners) for (const name of names) model.on(`change:${name}`, draw);
  return () => {
    clearInterval(ticker);
    context.dispose();
    store.views.delete(view);
    for (const [names, draw] of listeners) for (const name of names) model.off(`change:${name}`, draw);
  };
}

export default { initialize, render };

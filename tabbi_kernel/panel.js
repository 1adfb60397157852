// tabbi chat panel: the front end of tabbi_kernel.panel.ChatPanel.
// The conversation arrives as small operations (custom widget messages: "ops"), applied to one copy
// per widget model in this page (the store) and to each view's DOM in place; a model that joins late
// asks for one "snapshot". Coarse state (status, permissions, notices) comes as traitlets.
// No build step, no dependencies. Everything from the model or the repository is treated as text:
// Markdown becomes DOM nodes built with createElement and text nodes from allow-listed tags (see
// "Markdown, safe by construction" below), so no HTML or script a model or a repository writes can run.

const STATES = {
  starting: ["#d08700", "Starting"],
  running: ["#1a7f37", "Running"],
  paused: ["#8c959f", "Paused"],
  error: ["#cf222e", "Error"],
  idle: ["#8c959f", "Idle"],
};

// -- Markdown, safe by construction --------------------------------------------------------------
// The agent's text is parsed into a small tree of plain objects ({t: tag, a: attributes, c: children},
// or a string, which only ever becomes a text node) and built with createElement/textContent: no
// string of the agent's reaches innerHTML. Tags come from MD_TAGS, attributes from MD_ATTRS; the only
// attribute that carries the agent's text is a link's href, and only for http(s) URLs (safeUrl).
// docs/security.md ("Markdown in the panel") says why.

const MD_TAGS = new Set(["p", "br", "strong", "em", "del", "code", "pre", "a", "h3", "h4", "h5", "h6",
  "ul", "ol", "li", "blockquote", "hr", "table", "thead", "tbody", "tr", "th", "td", "span", "div", "button"]);
const MD_ATTRS = new Set(["class", "href", "target", "rel", "start", "data-lang", "data-action", "title", "type"]);
const MAX_DEPTH = 8; // quotes in lists in quotes...: deeper nesting renders as text

// An http(s) URL, normalized, or null: javascript:, data:, vbscript:, relative and malformed URLs
// are refused (the URL parser decides the scheme, so case, whitespace and entity tricks do not help).
export function safeUrl(raw) {
  const text = String(raw).trim();
  if (/[\u0000-\u001f\s]/.test(text)) return null;
  let url;
  try { url = new URL(text); } catch { return null; }
  return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
}

const node = (t, a, ...c) => ({ t, a: a || {}, c: c.flat() });

// -- syntax highlighting: one small tokenizer per language ----------------------------------------
const words = (text) => new Set(text.split(/\s+/).filter(Boolean));
const PY_KEYWORDS = words(`False None True and as assert async await break class continue def del elif
  else except finally for from global if import in is lambda nonlocal not or pass raise return try while
  with yield match case self`);
const PY_BUILTINS = words(`print len range open str int float bool list dict set tuple type isinstance
  enumerate zip map filter sorted sum min max abs super object Exception ValueError TypeError KeyError`);
const SH_KEYWORDS = words(`if then else elif fi for in do done while until case esac function return
  export local set unset source cd echo exit`);
const SQL_KEYWORDS = words(`select from where and or not in is null as join left right inner outer full on
  group by order having limit offset insert into values update set delete create table drop alter index
  primary key foreign references distinct union all case when then else end with count sum avg min max
  asc desc like between exists`);
const JS_KEYWORDS = words(`const let var function return if else for while do break continue class new this
  import export from default async await try catch finally throw typeof instanceof in of null undefined
  true false`);

// [class, pattern] in priority order; "word" tokens are classed by the language's keyword sets.
const STRINGS = String.raw`"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'`;
const END = String.raw`(?![\s\S])`; // the end of the code ("$" is a line's end here: flag m)
const NUMBER = String.raw`\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b`;
const LANGS = {
  python: { rules: [["c", String.raw`#[^\n]*`],
    ["s", String.raw`[rRbBfFuU]{0,2}(?:"""[\s\S]*?(?:"""|${END})|'''[\s\S]*?(?:'''|${END})|${STRINGS})`],
    ["d", String.raw`@[A-Za-z_][\w.]*`], ["n", NUMBER], ["w", String.raw`[A-Za-z_]\w*`]],
  keywords: PY_KEYWORDS, builtins: PY_BUILTINS },
  bash: { rules: [["c", String.raw`(?:^|(?<=\s))#[^\n]*`], ["s", STRINGS], ["v", String.raw`\$\{[^}\n]*\}|\$[A-Za-z_]\w*|\$[0-9@#?$!*-]`],
    ["n", NUMBER], ["w", String.raw`[A-Za-z_][\w-]*`]], keywords: SH_KEYWORDS },
  json: { rules: [["k", String.raw`"(?:[^"\\\n]|\\.)*"(?=\s*:)`], ["s", STRINGS], ["n", String.raw`-?${NUMBER}`],
    ["w", String.raw`\b(?:true|false|null)\b`]], keywords: words("true false null") },
  sql: { rules: [["c", String.raw`--[^\n]*`], ["s", STRINGS], ["n", NUMBER], ["w", String.raw`[A-Za-z_]\w*`]],
    keywords: SQL_KEYWORDS, fold: true },
  yaml: { rules: [["c", String.raw`(?:^|(?<=\s))#[^\n]*`], ["k", String.raw`(?<=^[ \t]*(?:- )?)[\w.-]+(?=:(?:\s|$))`],
    ["s", STRINGS], ["n", NUMBER], ["w", String.raw`\b(?:true|false|null|yes|no)\b`]],
  keywords: words("true false null yes no") },
  javascript: { rules: [["c", String.raw`\/\/[^\n]*|\/\*[\s\S]*?(?:\*\/|${END})`], ["s", `${STRINGS}|\`(?:[^\`\\\\]|\\\\.)*\``],
    ["n", NUMBER], ["w", String.raw`[A-Za-z_$][\w$]*`]], keywords: JS_KEYWORDS },
};
const LANG_ALIASES = { py: "python", python3: "python", ipython: "python", "": "python", sh: "bash",
  shell: "bash", zsh: "bash", console: "bash", yml: "yaml", js: "javascript", ts: "javascript",
  typescript: "javascript", jsonc: "json", postgresql: "sql", sqlite: "sql", patch: "diff", udiff: "diff" };
const compiled = new Map();

function grammar(lang) {
  const name = LANG_ALIASES[lang] ?? lang;
  if (name === "diff" || !LANGS[name]) return name === "diff" ? "diff" : null;
  if (!compiled.has(name)) {
    const spec = LANGS[name];
    compiled.set(name, { ...spec, classes: spec.rules.map(([cls]) => cls),
      re: new RegExp(spec.rules.map(([, pattern]) => `(${pattern})`).join("|"), "gm") });
  }
  return compiled.get(name);
}

// Code as a list of strings and {span} nodes whose text, joined, is exactly the code.
export function highlight(code, lang = "") {
  const g = grammar(String(lang).toLowerCase());
  if (!g) return [code];
  if (g === "diff") {
    return code.split(/(?<=\n)/).map((line) => {
      const cls = line.startsWith("@@") ? "tb-n" : line.startsWith("+") ? "tb-add"
        : line.startsWith("-") ? "tb-del" : null;
      return cls ? node("span", { class: cls }, line) : line;
    });
  }
  const out = [];
  let last = 0;
  g.re.lastIndex = 0;
  for (let m; (m = g.re.exec(code));) {
    if (!m[0]) { g.re.lastIndex++; continue; }
    let cls = g.classes[m.slice(1).findIndex((group) => group !== undefined)];
    if (cls === "w") {
      const word = g.fold ? m[0].toLowerCase() : m[0];
      cls = g.keywords?.has(word) ? "k" : g.builtins?.has(word) ? "b" : null;
      if (!cls) continue; // a plain name stays in the surrounding text
    }
    if (m.index > last) out.push(code.slice(last, m.index));
    out.push(node("span", { class: `tb-${cls}` }, m[0]));
    last = m.index + m[0].length;
  }
  if (last < code.length) out.push(code.slice(last));
  return out;
}

// -- inline marks ---------------------------------------------------------------------------------
const INLINE = new RegExp([
  String.raw`(\`+)([^\`]|[\s\S]*?[^\`])\1(?!\`)`, // 1,2 code span
  String.raw`\[((?:[^\[\]\n]|\[[^\[\]\n]*\]){1,500})\]\(\s*<?([^\s<>()]*(?:\([^\s<>()]*\)[^\s<>()]*)*)>?(?:\s+"[^"\n]*")?\s*\)`, // 3,4 link
  String.raw`(\*\*|__)(?=\S)([\s\S]*?\S)\5`, // 5,6 strong
  String.raw`\*(?=[^\s*])((?:[^*\n]|\*\*[^*\n]+\*\*)*?[^\s*])\*`, // 7 emphasis
  String.raw`_(?=[^\s_])([^_\n]*?[^\s_])_`, // 8 emphasis
  String.raw`~~(?=\S)([\s\S]*?\S)~~`, // 9 strikethrough
  String.raw`<(https?:\/\/[^\s<>]+)>|(https?:\/\/[^\s<>()\[\]]*[^\s<>()\[\].,;:!?'"*_~])`, // 10,11 autolink
].join("|"), "g");

const isWord = (ch) => !!ch && /[\p{L}\p{N}_]/u.test(ch);

export function inline(text, depth = 0) {
  if (depth > MAX_DEPTH) return [text];
  const out = [];
  let last = 0;
  const re = INLINE; // one compiled pattern; a nested call resets it, so the loop sets where to go on
  for (let at = 0, m; (re.lastIndex = at, m = re.exec(text));) {
    const [whole] = m;
    const end = m.index + whole.length;
    at = end;
    let made = null;
    if (m[1] !== undefined) {
      const body = m[2].length > 2 && m[2].startsWith(" ") && m[2].endsWith(" ") ? m[2].slice(1, -1) : m[2];
      made = node("code", {}, body);
    } else if (m[3] !== undefined) {
      const href = safeUrl(m[4]);
      // a refused link shows as the text it was written as, so the reader sees what was attempted
      if (!href) continue;
      made = node("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" }, inline(m[3], depth + 1));
    } else if (m[5] !== undefined || m[7] !== undefined || m[8] !== undefined) {
      // snake_case_names are not emphasis: "_" needs a non-word character on the outside
      if (whole[0] === "_" && (isWord(text[m.index - 1]) || isWord(text[end]))) {
        at = m.index + (m[5] ?? "_").length;
        continue;
      }
      made = node(m[5] !== undefined ? "strong" : "em", {}, inline(m[6] ?? m[7] ?? m[8], depth + 1));
    } else if (m[9] !== undefined) {
      made = node("del", {}, inline(m[9], depth + 1));
    } else {
      const href = safeUrl(m[10] ?? m[11]);
      if (!href) continue;
      made = node("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" }, m[10] ?? m[11]);
    }
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push(made);
    last = end;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

// -- blocks -----------------------------------------------------------------------------------------
const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HR = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const TABLE_RULE = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

// The text cut into blocks: runs of non-blank lines, and fenced code (blank lines and all) on its
// own; from offset `from` (the start of a block) on, each with where it starts.
function splitFrom(text, from = 0) {
  const blocks = [];
  let current = [];
  let start = from;
  let fence = null;
  const close = () => { if (current.length) blocks.push({ source: current.join("\n"), start }); current = []; };
  for (let at = from; at <= text.length;) {
    let stop = text.indexOf("\n", at);
    if (stop < 0) stop = text.length;
    const line = text.slice(at, stop);
    if (!current.length) start = at;
    at = stop + 1;
    if (fence) {
      current.push(line);
      const m = line.match(/^ {0,3}(`{3,}|~{3,})[ \t]*$/);
      if (m && m[1][0] === fence[0] && m[1].length >= fence.length) { fence = null; close(); }
      continue;
    }
    const m = line.match(FENCE);
    if (m) { close(); start = at - line.length - 1; fence = m[1]; current.push(line); continue; }
    if (!line.trim()) close(); else current.push(line);
  }
  close();
  return blocks;
}

export function splitBlocks(text) {
  return splitFrom(String(text)).map((block) => block.source);
}

const splitRow = (line) => {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
};

function table(lines, depth) {
  const aligns = splitRow(lines[1]).map((cell) =>
    cell.startsWith(":") && cell.endsWith(":") ? "center" : cell.endsWith(":") ? "right" : cell.startsWith(":") ? "left" : null);
  const cell = (tag, text, i) => node(tag, aligns[i] ? { class: `tb-al-${aligns[i]}` } : {}, inline(text, depth + 1));
  const head = splitRow(lines[0]);
  const rows = lines.slice(2).map((line) => {
    const cells = splitRow(line);
    return node("tr", {}, head.map((_, i) => cell("td", cells[i] ?? "", i)));
  });
  return node("div", { class: "tb-table" }, node("table", {},
    node("thead", {}, node("tr", {}, head.map((text, i) => cell("th", text, i)))), node("tbody", {}, rows)));
}

// A list from its lines: items by marker, nested by indentation, other lines continue the item.
function list(lines, depth) {
  const items = [];
  const first = lines[0].match(ITEM);
  const indent = first[1].replace(/\t/g, "    ").length;
  const ordered = /\d/.test(first[2]);
  for (const line of lines) {
    const m = line.match(ITEM);
    const own = m && m[1].replace(/\t/g, "    ").length <= indent + 1 && /\d/.test(m[2]) === ordered;
    if (own || !items.length) items.push([m ? (m[3] ?? "") : line.trim()]);
    else items[items.length - 1].push(line);
  }
  const children = items.map(([head, ...more]) => {
    const subIndex = more.findIndex((line) => ITEM.test(line) || QUOTE.test(line) || FENCE.test(line));
    const text = [head, ...(subIndex < 0 ? more : more.slice(0, subIndex)).map((l) => l.trim())];
    const nested = subIndex < 0 ? [] : blockNodes(dedent(more.slice(subIndex)), depth + 1);
    return node("li", {}, paragraphLines(text, depth), nested);
  });
  const start = ordered ? parseInt(first[2], 10) : 1;
  return node(ordered ? "ol" : "ul", ordered && start !== 1 ? { start: String(start) } : {}, children);
}

function dedent(lines) {
  const pad = Math.min(...lines.filter((l) => l.trim()).map((l) => l.match(/^[ \t]*/)[0].length));
  return lines.map((l) => l.slice(pad)).join("\n");
}

// Lines of a paragraph: inline marks, a line break between lines.
function paragraphLines(lines, depth) {
  const out = [];
  lines.forEach((line, i) => {
    if (i) out.push(node("br"));
    out.push(...inline(line, depth + 1));
  });
  return out;
}

// A fenced code block: the language, Copy and Insert-as-cell (handled by the panel), the code.
export function codeBlock(code, lang = "") {
  return node("div", { class: "tb-codeblock", "data-lang": lang },
    node("div", { class: "tb-codebar" },
      node("span", { class: "tb-lang" }, lang || "code"),
      node("button", { class: "tb-btn tb-copy", type: "button", "data-action": "copy", title: "Copy this code" }, "Copy"),
      node("button", { class: "tb-btn tb-insert-cell", type: "button", "data-action": "insert-cell",
        title: "Insert this code as a new cell below the panel" }, "Insert as cell")),
    node("pre", { class: "tb-code" }, node("code", {}, highlight(code, lang))));
}

// One block (see splitBlocks) as a list of nodes.
export function blockNodes(text, depth = 0) {
  if (depth > MAX_DEPTH) return [node("p", {}, text)];
  const lines = text.split("\n");
  const fence = lines[0].match(FENCE);
  if (fence && splitBlocks(text).length <= 1) {
    let end = lines.length;
    // a closing fence ends it; a block still streaming has none yet (and maybe a last empty line)
    if (lines.length > 1 && /^ {0,3}(`{3,}|~{3,})[ \t]*$/.test(lines[end - 1])) end--;
    else if (lines.length > 1 && !lines[end - 1].trim()) end--;
    const pad = lines[0].match(/^ */)[0].length; // an indented fence's code loses that indentation
    const indent = new RegExp(`^ {0,${pad}}`);
    const code = lines.slice(1, end).map((l) => l.replace(indent, "")).join("\n");
    return [codeBlock(code, fence[2].toLowerCase())];
  }
  if (fence) return splitBlocks(text).flatMap((block) => blockNodes(block, depth + 1));
  const out = [];
  let para = [];
  const closePara = () => { if (para.length) out.push(node("p", {}, paragraphLines(para, depth))); para = []; };
  for (let i = 0; i < lines.length;) {
    const line = lines[i];
    let m;
    if ((m = line.match(HEADING))) {
      closePara();
      out.push(node(`h${Math.min(m[1].length + 2, 6)}`, {}, inline(m[2] || "", depth + 1)));
      i++;
    } else if (HR.test(line) && !(para.length && /^ {0,3}-+[ \t]*$/.test(line))) {
      closePara();
      out.push(node("hr"));
      i++;
    } else if (/^ {0,3}-+[ \t]*$|^ {0,3}=+[ \t]*$/.test(line) && para.length) { // setext heading
      const title = para.join(" ");
      para = [];
      out.push(node(line.trim()[0] === "=" ? "h3" : "h4", {}, inline(title, depth + 1)));
      i++;
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-")) {
      closePara();
      let end = i + 2;
      while (end < lines.length && lines[end].includes("|")) end++;
      out.push(table(lines.slice(i, end), depth));
      i = end;
    } else if (QUOTE.test(line)) {
      closePara();
      let end = i;
      while (end < lines.length && QUOTE.test(lines[end])) end++;
      const inner = lines.slice(i, end).map((l) => l.match(QUOTE)[1]).join("\n");
      out.push(node("blockquote", {}, splitBlocks(inner).flatMap((b) => blockNodes(b, depth + 1))));
      i = end;
    } else if ((m = line.match(ITEM)) && (m[3] !== undefined || !para.length)) {
      closePara();
      let end = i + 1;
      while (end < lines.length && !HEADING.test(lines[end]) && !HR.test(lines[end]) && !QUOTE.test(lines[end])) end++;
      out.push(list(lines.slice(i, end), depth));
      i = end;
    } else {
      para.push(line.trim());
      i++;
    }
  }
  closePara();
  return out;
}

// The whole text as a list of nodes (one entry per block, in order).
export function renderMarkdown(text) {
  return splitBlocks(text).flatMap((block) => blockNodes(block));
}

// A node tree as DOM: tags and attributes from the allow-lists only, text as text nodes.
export function toDom(tree) {
  if (typeof tree === "string") return document.createTextNode(tree);
  const tag = MD_TAGS.has(tree.t) ? tree.t : "span";
  const dom = document.createElement(tag);
  for (const [key, value] of Object.entries(tree.a)) {
    if (!MD_ATTRS.has(key)) continue;
    if (key === "href") { const href = safeUrl(value); if (href) dom.setAttribute("href", href); continue; }
    dom.setAttribute(key, String(value));
  }
  for (const child of tree.c) dom.append(toDom(child));
  return dom;
}

// Blocks of a text, each with what `build` made of it, re-using those of `state` (the text before)
// that did not change. A streamed text only grows: then only its last two blocks can change (a
// block closes on a whole line, and only the last line can still grow), so only they are split
// and parsed again. Returns the new state.
export function updateBlocks(state, text, build) {
  const old = state?.blocks || [];
  const keep = state && text.startsWith(state.text) ? Math.max(0, old.length - 2) : 0;
  const fresh = splitFrom(text, keep ? old[keep].start : 0);
  const blocks = old.slice(0, keep);
  fresh.forEach((block, i) => {
    const before = old[keep + i];
    blocks.push(before && before.source === block.source && before.start === block.start
      ? before : { ...block, nodes: build(block.source) });
  });
  return { text, blocks };
}

// Markdown into a container, re-using the DOM of the blocks that did not change since the last
// call on it: a long message streamed in many deltas costs about its last block per frame, not
// its whole length.
export function renderInto(container, text) {
  const previous = container.__tbMarkdown?.blocks || [];
  const next = updateBlocks(container.__tbMarkdown, text, (source) => blockNodes(source).map(toDom));
  let same = 0; // keep nodes in place up to the first change (no re-layout, selection kept)
  while (same < next.blocks.length && same < previous.length && next.blocks[same] === previous[same]) same++;
  for (const old of previous.slice(same)) for (const dom of old.nodes) dom.remove();
  for (const entry of next.blocks.slice(same)) container.append(...entry.nodes);
  container.__tbMarkdown = next;
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
    else renderInto(div, part.text);
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
    const old = entry.parts.get(part.id);
    if (old?.matches(".tb-assistant .tb-text") && part.type === "text" && part.text) {
      renderInto(old, part.text); // streamed text: only its changed blocks are parsed and rebuilt
      return;
    }
    const node = drawPart(message, part, store.openTools);
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

// A code block's buttons (event delegation: blocks are rebuilt while text streams). The code is
// the block's own text, exactly as the agent wrote it.
function codeAction(model, event) {
  const button = event.target.closest?.(".tb-codeblock button[data-action]");
  if (!button) return;
  const code = button.closest(".tb-codeblock").querySelector("pre code, pre").textContent;
  const done = (word) => {
    button.textContent = word;
    setTimeout(() => { button.textContent = button.dataset.action === "copy" ? "Copy" : "Insert as cell"; }, 1500);
  };
  if (button.dataset.action === "copy") {
    copyText(code).then(() => done("Copied"), () => done("Copy failed"));
  } else if (insertCell(model, code)) {
    done("Inserted");
  } else {
    model.send({ type: "insert_cell", code }); // no notebook here: the kernel shows it to copy
  }
}

// The clipboard API exists only in secure contexts (https, localhost); a Jupyter served over plain
// http elsewhere gets the older copy command on a selected, off-screen text area.
function copyText(text) {
  if (navigator.clipboard?.writeText) return navigator.clipboard.writeText(text);
  const area = el("textarea", { class: "tb-offscreen", readonly: "" });
  area.value = text;
  document.body.append(area);
  area.select();
  const copied = document.execCommand("copy");
  area.remove();
  return copied ? Promise.resolve() : Promise.reject(new Error("copy refused"));
}

// A new code cell holding `code`, below the panel's cell (after cells inserted from this panel
// before, so they keep their order). A kernel cannot do this from a widget message
// (set_next_input only rides on an execute reply), but the page's notebook model can: the same
// model in JupyterLab and Notebook 7. False where there is no notebook (a console, other front ends).
export function insertCell(model, code) {
  const notebook = model.widget_manager?.context?.model;
  const cells = notebook?.cells;
  if (!cells || !notebook.sharedModel?.insertCell) return false;
  const key = model.get("key");
  const tabbi = (cell) => (cell.getMetadata ? cell.getMetadata("tabbi") : cell.metadata?.tabbi) || {};
  let index = -1;
  for (let i = 0; i < cells.length && index < 0; i++) {
    const cell = cells.get(i);
    for (let j = 0; cell.type === "code" && j < cell.outputs.length; j++) {
      if ((cell.outputs.get(j).metadata || {}).tabbi?.transcript === key) index = i + 1;
    }
  }
  if (index < 0) index = cells.length; // the panel's output is not in this notebook: at the end
  while (index < cells.length && tabbi(cells.get(index)).inserted === key) index++;
  notebook.sharedModel.insertCell(index, { cell_type: "code", source: code, metadata: { tabbi: { inserted: key } } });
  return true;
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
  const typed = el("input", { class: "tb-context-input", type: "text", placeholder: "df, @cell:3, @error, @file:PATH" });
  // The kernel's options are redrawn on each answer; the input stays where it is, so that an
  // answer arriving while the person types neither moves it nor takes its focus.
  const options = el("span", { class: "tb-context-options" });
  const menu = el("div", { class: "tb-context-menu", hidden: "" }, options, typed);
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
      options.replaceChildren(...(msg.options || []).map((o) => el("button", {
        class: "tb-btn tb-context-option", "data-spec": o.spec, onclick: () => add(o.spec) }, `${o.spec} — ${o.what}`)));
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
  root.addEventListener("click", (event) => codeAction(model, event));
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
    if (code) extra.append(toDom(codeBlock(code, "python")));
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

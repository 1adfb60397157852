// The panel's Markdown renderer (tabbi_kernel/panel.js), without a browser: what it makes of what
// agents write, and that nothing an agent writes becomes markup. Run: node --test tests/js/
// Threat: the agent's text is attacker-controlled (a prompt injection in the repository can make it
// write anything). Whatever it writes may only become the allow-listed tags below, with our own
// attributes; a link's href is the one attribute carrying its text, and only http(s).
import assert from "node:assert/strict";
import { test } from "node:test";

import { blockNodes, highlight, inline, renderMarkdown, safeUrl, splitBlocks, updateBlocks }
  from "../../tabbi_kernel/panel.js";

const TAGS = new Set(["p", "br", "strong", "em", "del", "code", "pre", "a", "h3", "h4", "h5", "h6", "ul", "ol",
  "li", "blockquote", "hr", "table", "thead", "tbody", "tr", "th", "td", "span", "div", "button"]);

function* walk(tree) {
  for (const item of Array.isArray(tree) ? tree : [tree]) {
    if (typeof item === "string") continue;
    yield item;
    yield* walk(item.c);
  }
}
const text = (tree) => (Array.isArray(tree) ? tree : [tree])
  .map((n) => (typeof n === "string" ? n : text(n.c))).join("");
const find = (tree, tag) => [...walk(tree)].filter((n) => n.t === tag);

const HOSTILE = [
  "<script>window.__pwned=1</script>", '<img src=x onerror="window.__pwned=2">', "[x](javascript:alert(1))",
  "[x](JaVaScRiPt:alert(1))", "[x]( javascript:alert(1))", "[x](data:text/html,<script>alert(1)</script>)",
  "[x](vbscript:msgbox)", "<!-- hidden --> <a href=javascript:alert(1)>a</a>", "<style>*{display:none}</style>",
  '<svg onload="alert(1)">', "<https://ok.example/\" onmouseover=\"alert(1)>",
  "```python\n</code></pre><script>alert(1)</script>\n```", "**<b onclick=alert(1)>x</b>**",
  "| a | <img src=x onerror=alert(1)> |\n|---|---|\n| [y](javascript:1) | `<script>` |",
  "> <iframe src=javascript:alert(1)>\n> - [z](jav&#x61;script:alert(1))",
];

test("nothing an agent writes becomes markup of its own", () => {
  for (const payload of HOSTILE) {
    const tree = renderMarkdown(payload);
    for (const n of walk(tree)) {
      assert.ok(TAGS.has(n.t), `${n.t} from ${payload}`);
      for (const [key, value] of Object.entries(n.a)) {
        assert.ok(!key.startsWith("on") && key !== "style" && key !== "src", `${key} from ${payload}`);
        if (key === "href") assert.match(value, /^https?:\/\//, payload);
      }
    }
    assert.equal(find(tree, "a").filter((a) => !/^https?:/.test(a.a.href)).length, 0);
  }
  // the refused link stays visible as what was written
  assert.equal(text(renderMarkdown("[x](javascript:alert(1))")), "[x](javascript:alert(1))");
  assert.equal(text(renderMarkdown(HOSTILE[0])), HOSTILE[0]);
});

test("safeUrl lets http(s) through and nothing else", () => {
  assert.equal(safeUrl("https://example.com/a?b=1"), "https://example.com/a?b=1");
  assert.equal(safeUrl("http://example.com"), "http://example.com/");
  for (const bad of ["javascript:alert(1)", "JAVASCRIPT:x", "java\nscript:x", " javascript:x", "data:,x",
    "vbscript:x", "/relative", "//host/x", "file:///etc/passwd", "https://a b"]) assert.equal(safeUrl(bad), null, bad);
});

test("what agents write: headings, lists, quotes, tables, rules, inline marks", () => {
  const tree = renderMarkdown([
    "## Plan", "", "Some **bold**, *italic*, _also_, ~~gone~~, `code` and my_snake_case name.",
    "See [the docs](https://example.com/a_(b)) or https://example.org.", "",
    "- one", "- two", "  - nested", "- three", "", "3. c", "4. d", "", "> quoted **text**", "", "---", "",
    "| name | n |", "|:-----|--:|", "| a | 1 |", "| b \\| c | 2 |"].join("\n"));
  assert.deepEqual(find(tree, "h4").map(text), ["Plan"]);
  assert.deepEqual(find(tree, "strong").map(text), ["bold", "text"]);
  assert.deepEqual(find(tree, "em").map(text), ["italic", "also"]);
  assert.deepEqual(find(tree, "del").map(text), ["gone"]);
  assert.ok(text(tree).includes("my_snake_case name"));
  assert.deepEqual(find(tree, "a").map((a) => a.a.href), ["https://example.com/a_(b)", "https://example.org/"]);
  const [ul] = find(tree, "ul");
  assert.equal(ul.c.length, 3);
  assert.deepEqual(find(ul.c[1].c, "li").map(text), ["nested"]);
  const [ol] = find(tree, "ol");
  assert.equal(ol.a.start, "3");
  assert.equal(find(tree, "blockquote").length, 1);
  assert.equal(find(tree, "hr").length, 1);
  assert.deepEqual(find(tree, "th").map(text), ["name", "n"]);
  assert.deepEqual(find(tree, "td").map(text), ["a", "1", "b | c", "2"]);
  assert.equal(find(tree, "td")[1].a.class, "tb-al-right");
});

test("fenced code keeps its text exactly, with buttons and a language", () => {
  const code = 'def f(x):\n    """doc"""\n\n    return x + 1  # one\n</code><script>';
  const tree = renderMarkdown(`Here:\n\n\`\`\`python\n${code}\n\`\`\`\n\nand \`\`\`inline\`\`\` too`);
  const [block] = find(tree, "div").filter((n) => n.a.class === "tb-codeblock");
  assert.equal(block.a["data-lang"], "python");
  assert.equal(text(find(block, "code")), code);
  assert.deepEqual(find(block, "button").map((b) => b.a["data-action"]), ["copy", "insert-cell"]);
  assert.ok(find(block, "span").some((s) => s.a.class === "tb-k" && text(s) === "def"));
  assert.ok(find(block, "span").some((s) => s.a.class === "tb-c" && text(s) === "# one"));
  // an unclosed fence (a message still streaming) is code up to the end
  const open = renderMarkdown("```bash\necho $HOME\n");
  assert.equal(text(find(open, "code")), "echo $HOME");
});

test("each highlighter keeps the text and marks its tokens", () => {
  const samples = {
    python: ["@cache\nclass A: x = f'{y}' # c", ["tb-d", "tb-k", "tb-s", "tb-c"]],
    bash: ['export X="a b" # c\necho $X', ["tb-k", "tb-s", "tb-c", "tb-v"]],
    json: ['{"a": [1, true, "s"]}', ["tb-k", "tb-n", "tb-s"]],
    sql: ["SELECT a FROM t WHERE b = 'x' -- c", ["tb-k", "tb-s", "tb-c"]],
    yaml: ["key: 'v' # c\n- item: 3", ["tb-k", "tb-s", "tb-c", "tb-n"]],
    diff: ["@@ -1 +1 @@\n-a\n+b\n", ["tb-n", "tb-del", "tb-add"]],
  };
  for (const [lang, [code, classes]] of Object.entries(samples)) {
    const out = highlight(code, lang);
    assert.equal(text(out), code, lang);
    const found = new Set(out.filter((n) => typeof n !== "string").map((n) => n.a.class));
    for (const cls of classes) assert.ok(found.has(cls), `${lang}: ${cls}`);
  }
  assert.deepEqual(highlight("<b>x</b>", "unknown-lang"), ["<b>x</b>"]);
  // a docstring over several lines is one string, and what follows it is code again
  const doc = highlight('def f():\n    """One.\n\n    Two."""\n    return 1', "python");
  assert.deepEqual(doc.filter((n) => n.a?.class === "tb-s").map(text), ['"""One.\n\n    Two."""']);
  assert.ok(doc.some((n) => n.a?.class === "tb-k" && text(n) === "return"));
});

test("a streamed message re-parses only its changed blocks", () => {
  const message = Array.from({ length: 200 }, (_, i) => `Paragraph ${i} with **bold** and \`code\`.`).join("\n\n");
  let state = null;
  let parsed = 0;
  for (let end = 1; end <= message.length + 37; end += 37) {
    state = updateBlocks(state, message.slice(0, end), (source) => { parsed += source.length; return blockNodes(source); });
  }
  // each block is parsed while it streams (~its length / 37 times), never once per later delta
  assert.ok(parsed < message.length * 3, `parsed ${parsed} characters for a ${message.length}-character message`);
  assert.deepEqual(state.blocks.map((b) => b.source), splitBlocks(message));
  assert.deepEqual(state.blocks.map((b) => b.nodes), splitBlocks(message).map((b) => blockNodes(b)));
  // what streams may turn a closed block into something else: the result is still the whole parse
  for (const [before, after] of [["a\n\n```", "```python\nx\n```"], ["x\n\n```\ncode\n``", "`\n\nmore"],
    ["para\n", "more"], ["| a |\n", "|---|\n| 1 |"]]) {
    const grown = updateBlocks(updateBlocks(null, before, blockNodes), before + after, blockNodes);
    assert.deepEqual(grown.blocks.map((b) => b.nodes), splitBlocks(before + after).map((b) => blockNodes(b)), before + after);
  }
});

test("inline marks nest and stay bounded", () => {
  assert.deepEqual(find(inline("**a *b* c**"), "em").map(text), ["b"]);
  const deep = "[".repeat(50) + "x" + "](https://e.com)".repeat(50);
  assert.ok(text(inline(deep)).length > 0);
  const stars = "*a ".repeat(5000);
  const started = performance.now();
  renderMarkdown(stars);
  assert.ok(performance.now() - started < 5000);
});

// What re-rendering a streamed message costs the panel's Markdown renderer (tabbi_kernel/panel.js)
// as the message grows. The panel re-renders a streaming text part at most once per animation frame;
// each frame here adds DELTA characters. Baseline, measured in the same run: parsing the whole text
// every frame (what a plain "render the part again" does). New: updateBlocks, as the panel does it
// (a text that grew: split and parse again only its last two blocks). Parsing only (node has no DOM); the DOM
// built follows the same blocks, so it scales the same way.
// Run: node bench/bench_markdown.mjs [DELTA]
import { blockNodes, renderMarkdown, updateBlocks } from "../tabbi_kernel/panel.js";

const DELTA = Number(process.argv[2] || 40);
const CHUNK = [
  "## Step\n\nI changed **calc.py** so that `add` handles *floats*; see [the docs](https://docs.python.org/3/).\n\n",
  "- first point with `code`\n- second point\n  - nested detail\n\n",
  "```python\ndef add(a: float, b: float) -> float:\n    \"\"\"Add.\"\"\"\n    return a + b  # simple\n```\n\n",
  "| file | change |\n|---|---|\n| calc.py | +3 -1 |\n\n> Note: tests pass.\n\n",
].join("");

function stream(message, step) {
  let started = performance.now();
  let worst = 0;
  for (let end = DELTA; end < message.length + DELTA; end += DELTA) {
    const t = performance.now();
    step(message.slice(0, end));
    worst = Math.max(worst, performance.now() - t);
  }
  return { total: performance.now() - started, worst };
}

console.log(`node ${process.version}, ${DELTA} characters per frame`);
console.log("chars     frames   full re-parse: total / worst frame   blocks: total / worst frame   ratio");
for (const size of [5_000, 20_000, 50_000]) {
  const message = CHUNK.repeat(Math.ceil(size / CHUNK.length)).slice(0, size);
  const frames = Math.ceil(message.length / DELTA);
  const full = stream(message, (text) => renderMarkdown(text));
  let state = null;
  const inc = stream(message, (text) => { state = updateBlocks(state, text, blockNodes); });
  console.log(`${String(size).padEnd(9)} ${String(frames).padEnd(8)} ` +
    `${full.total.toFixed(0).padStart(8)} ms / ${full.worst.toFixed(2).padStart(6)} ms            ` +
    `${inc.total.toFixed(0).padStart(6)} ms / ${inc.worst.toFixed(2).padStart(6)} ms      ` +
    `${(full.total / inc.total).toFixed(1)}x`);
}

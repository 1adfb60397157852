"""What attaching a variable costs (``tabbi_kernel.context``): a data frame's (or array's) description
at 1 MB, 100 MB and 1 GB, pandas, polars and numpy, against a baseline measured in the same run
(``df.head()``: what anyone would call to look at a frame), and the peak memory it adds (it must
add nothing proportional to the data: no copy).

Run: ``.venv/bin/python bench/bench_context.py [N]``. Each (library, size) runs in a fresh
interpreter, so one's memory does not hide another's. The peak is measured by resetting the
kernel's high-water mark (``/proc/self/clear_refs``) after the data is built, then reading
``VmHWM`` after the gathers: a copy of the data would show as growth of its size.
"""

from __future__ import annotations

import json
import subprocess
import sys

from harness import machine

SIZES = {"1 MB": 1_000_000, "100 MB": 100_000_000, "1 GB": 1_000_000_000}

CHILD = r"""
import gc, json, statistics, sys, time
import numpy as np
from tabbi_kernel import context

library, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = max(size // 64, 10)  # 8 columns of 8 bytes
rng = np.random.default_rng(0)
columns = {f"c{i}": (rng.random(rows) if i % 2 else np.arange(rows, dtype="int64")) for i in range(8)}
if library == "pandas":
    import pandas as pd
    data = pd.DataFrame(columns)
    baseline = lambda: data.head()
elif library == "polars":
    import polars as pl
    data = pl.DataFrame(columns)
    baseline = lambda: data.head()
else:
    data = np.empty((rows, 8), dtype="float64")
    for i in range(8):
        data[:, i] = columns[f"c{i}"]
    baseline = lambda: data[:5].copy()
del columns
gc.collect()

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

nbytes = int(data.memory_usage().sum()) if library == "pandas" else int(data.estimated_size()) \
    if library == "polars" else int(data.nbytes)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS to the current RSS
rss = status("VmRSS")
base, gather = [], []
for _ in range(n):
    t = time.perf_counter(); baseline(); base.append(time.perf_counter() - t)
    t = time.perf_counter(); a = context.variable("df", data); gather.append(time.perf_counter() - t)
print(json.dumps({"nbytes": nbytes, "rows": rows, "base": statistics.median(base),
                  "gather": statistics.median(gather), "peak_growth": status("VmHWM") - rss,
                  "attachment_bytes": a.size}))
"""


def main(n: int = 20) -> None:
    print(f"machine: {machine()}")
    print(f"{'library':8} {'size':>7} {'data bytes':>14} {'baseline head()':>16} {'attach':>9} {'ratio':>6} "
          f"{'peak RSS growth':>16} {'attachment':>10}")
    for library in ("pandas", "polars", "numpy"):
        for label, size in SIZES.items():
            out = subprocess.run([sys.executable, "-c", CHILD, library, str(size), str(n)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{library:8} {label:>7} {r['nbytes']:>14,} {r['base'] * 1000:>13.3f} ms "
                  f"{r['gather'] * 1000:>6.3f} ms {r['gather'] / r['base']:>6.1f} "
                  f"{r['peak_growth'] / 1e6:>13.1f} MB {r['attachment_bytes']:>8,} B")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)

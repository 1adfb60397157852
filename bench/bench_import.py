"""What ``%load_ext tabbi_kernel`` costs a kernel: importing tabbi_kernel and registering the
magics, on top of what every IPython kernel imports anyway (the baseline, measured in this run).

Run: ``.venv/bin/python bench/bench_import.py [N]``. Each sample is a fresh interpreter.
"""

from __future__ import annotations

import statistics
import subprocess
import sys

from harness import machine

KERNEL = (
    "import time; t0 = time.perf_counter()\n"
    "import IPython, ipykernel.ipkernel; t1 = time.perf_counter()\n"
)
TABBI = (
    "from IPython.testing.globalipapp import get_ipython\nip = get_ipython()\nt2 = time.perf_counter()\n"
    "import tabbi_kernel; tabbi_kernel.load_ipython_extension(ip); t3 = time.perf_counter()\n"
    "print(t1 - t0, t3 - t2)\n"
)


def main(n: int = 10) -> None:
    kernel, tabbi = [], []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", KERNEL + TABBI], capture_output=True, text=True,
                             check=True).stdout.split()
        kernel.append(float(out[0]))
        tabbi.append(float(out[1]))
    k, t = statistics.median(kernel), statistics.median(tabbi)
    print(f"machine: {machine()}")
    print(f"baseline: import IPython + ipykernel:           median {k * 1000:.1f} ms (n={n})")
    print(f"%load_ext tabbi_kernel (import + magics):      median {t * 1000:.1f} ms (n={n})")
    print(f"ratio tabbi / baseline: {t / k:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)

"""Wall time of `metalearn train NAME --quick` for every experiment (the README's promise: about
a minute each on a 2-core CPU), each in its own process, data caches warm.

Usage: python benchmarks/quick.py [NAME ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from metalearn.discovery import list_experiments


def main() -> None:
    """Run each experiment's quick mode and print its wall time and exit status."""
    names = sys.argv[1:] or [n for n, _ in list_experiments()]
    print(f"load average {os.getloadavg()[0]:.2f}; {len(names)} experiments")
    worst = 0.0
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = subprocess.run(["metalearn", "train", name, "--quick", "--no-progress",
                                  "--run-dir", f"{tmp}/run"], capture_output=True, text=True)
            dt = time.perf_counter() - t0
        worst = max(worst, dt)
        status = "ok" if out.returncode == 0 else f"exit {out.returncode}: " + \
            (out.stderr.strip().splitlines() or [""])[-1]
        print(f"{name:<20} {dt:6.1f} s  {status}", flush=True)
    print(f"slowest: {worst:.1f} s; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Peak resident memory of this process, for the benchmarks that run each case in a fresh one:
over its whole life, or since `reset_peak_rss` (e.g. the steps alone, after compiling)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MB.

    Not `ru_maxrss`: Linux carries that across fork and exec, so a worker started by a larger
    parent would report the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> float:
    """The peak so far (`peak_rss_mb`), then VmHWM started afresh from the current resident set
    (Linux: /proc/self/clear_refs), so that `peak_rss_mb` reports the peak of what runs after
    this; where that is not possible the peak simply carries on."""
    peak = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return peak

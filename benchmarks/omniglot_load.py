"""Seconds to load each Omniglot protocol's data: first (decoding every PNG) and cached (.npz).

The first load decodes and resizes every image of the zips (32,460 for the full Omniglot) and
writes the cache; a cached load reads the .npz and checks its checksum. Both go through
`tasks.load_protocol`, as the Omniglot experiments do; the uncached load uses a fresh cache
folder. Prints the load average beside the figures (other work on the machine slows them).

    python benchmarks/omniglot_load.py [--protocols vinyals minimal] [--cached-rounds 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from metalearn.tasks.data.omniglot import PROTOCOLS, load_protocol


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    """Time the first and the cached load of each protocol's data."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--protocols", nargs="+", default=["vinyals", "minimal"],
                   choices=list(PROTOCOLS))
    p.add_argument("--cached-rounds", type=int, default=5)
    args = p.parse_args()
    print(f"load average at the start: {os.getloadavg()[0]:.2f}")
    for name in args.protocols:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["METALEARN_CACHE"] = cache
            first, ds = _timed(lambda name=name: load_protocol(name))
            cached = sorted(_timed(lambda name=name: load_protocol(name))[0]
                            for _ in range(args.cached_rounds))
        print(f"{name}: {ds.num_classes} characters, {int(ds.counts.sum())} images "
              f"{ds.images.shape[2]}x{ds.images.shape[3]}: first load {first:.2f} s, cached "
              f"{cached[len(cached) // 2]:.3f} s (median of {len(cached)}; "
              f"{cached[0]:.3f}-{cached[-1]:.3f})")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Episodes per second: `FewShotSampler` (jit + vmap on device) vs a NumPy per-episode loop.

Omniglot 20-way 1-shot 15-query, batches of 32, by default on the two minimal background sets
(../shared/data/omniglot, or $METALEARN_OMNIGLOT). The NumPy baseline is written the way most
research code samples episodes: a Python loop over episodes, `np.random.choice` per class, images
stacked and converted per episode. Both produce the same float32 arrays. Prints peak memory.

    python benchmarks/sampling.py [--batches 50] [--rotations] [--ways 20 --shots 1 ...]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import jax
import numpy as np

from metalearn.tasks import FewShotSampler, load_omniglot


def numpy_batch(rng: np.random.Generator, images: np.ndarray, counts: np.ndarray, ways: int,
                shots: int, queries: int, batch: int, rotations: bool):
    """The usual research-code sampler: a Python loop over episodes and classes."""
    out = []
    n_classes = len(images) * (4 if rotations else 1)
    for _ in range(batch):
        classes = rng.choice(n_classes, ways, replace=False)
        sx, sy, qx, qy = [], [], [], []
        for label, c in enumerate(classes):
            base, rot = c % len(images), c // len(images)
            idx = rng.choice(counts[base], shots + queries, replace=False)
            imgs = np.rot90(images[base, idx], rot, axes=(1, 2)).astype(np.float32) / 255.0
            sx.append(imgs[:shots])
            qx.append(imgs[shots:])
            sy += [label] * shots
            qy += [label] * queries
        perm_s, perm_q = rng.permutation(ways * shots), rng.permutation(ways * queries)
        out.append((np.concatenate(sx)[perm_s], np.asarray(sy, np.int32)[perm_s],
                    np.concatenate(qx)[perm_q], np.asarray(qy, np.int32)[perm_q]))
    return [np.stack(a) for a in zip(*out, strict=True)]


def peak_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def main(argv: list[str] | None = None) -> dict:
    """Run both samplers and print episodes/second and memory."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ways", type=int, default=20)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--rotations", action="store_true", help="rotated classes (x4) as well")
    p.add_argument("--omniglot", nargs="*", default=None, help="Omniglot folders/zips")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    ds = load_omniglot(a.omniglot)
    t_load = time.perf_counter() - t0
    print(f"dataset: {ds.num_classes} classes x up to {ds.images.shape[1]} images "
          f"{ds.image_shape}, loaded in {t_load:.2f}s; peak RSS {peak_mib():.0f} MiB")
    cfg = (f"{a.ways}-way {a.shots}-shot {a.queries}-query, batch {a.batch_size}"
           f"{', rotations' if a.rotations else ''}")

    sampler = FewShotSampler(ds, a.ways, a.shots, a.queries, rotations=a.rotations)
    fn = jax.jit(lambda s, k: s.sample_batch(k, a.batch_size))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(sampler, jax.random.PRNGKey(0)))
    t_compile = time.perf_counter() - t0
    keys = jax.random.split(jax.random.PRNGKey(1), a.batches)
    t0 = time.perf_counter()
    for k in keys:
        batch = fn(sampler, k)
    jax.block_until_ready(batch)
    t_jax = time.perf_counter() - t0
    eps_jax = a.batches * a.batch_size / t_jax
    dev_mib = sampler._rows.nbytes / 2**20
    out_mib = sum(x.nbytes for x in jax.tree.leaves(batch)) / 2**20
    print(f"metalearn FewShotSampler ({cfg}): {eps_jax:,.0f} episodes/s "
          f"({1e3 * t_jax / a.batches:.1f} ms/batch; compile {t_compile:.2f}s); "
          f"images on device {dev_mib:.1f} MiB, one batch {out_mib:.1f} MiB; "
          f"peak RSS {peak_mib():.0f} MiB")

    rng = np.random.default_rng(0)
    n_np = max(2, a.batches // 5)
    numpy_batch(rng, ds.images, ds.counts, a.ways, a.shots, a.queries, 1, a.rotations)
    t0 = time.perf_counter()
    for _ in range(n_np):
        numpy_batch(rng, ds.images, ds.counts, a.ways, a.shots, a.queries, a.batch_size,
                    a.rotations)
    t_np = time.perf_counter() - t0
    eps_np = n_np * a.batch_size / t_np
    print(f"NumPy per-episode loop     ({cfg}): {eps_np:,.0f} episodes/s "
          f"({1e3 * t_np / n_np:.1f} ms/batch); peak RSS {peak_mib():.0f} MiB")
    print(f"speed-up: {eps_jax / eps_np:.1f}x (goal >= 10x) on {jax.devices()[0].platform} "
          f"({jax.devices()[0].device_kind}, {jax.local_device_count()} device(s))")
    return {"jax_eps": eps_jax, "numpy_eps": eps_np, "speedup": eps_jax / eps_np}


if __name__ == "__main__":
    main()

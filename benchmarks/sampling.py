"""Episodes per second: `FewShotSampler` (jit + vmap on device) vs a NumPy per-episode loop.

Omniglot 20-way 1-shot 15-query, batches of 32, by default on the two minimal background sets
(../shared/data/omniglot, or $METALEARN_OMNIGLOT). The NumPy baseline is written the way most
research code samples episodes: a Python loop over episodes, `np.random.choice` per class, images
stacked and converted per episode. Both produce the same float32 arrays. Prints peak memory.

`--augment` also times the sampler with random affine distortions (`tasks.augment`, Koch et
al.'s ranges) per image and per class in the same rounds, and then what they cost inside a
ProtoNet meta-step (8 channels, 20-way 1-shot 15-query, 8 episodes; `protonet.sampling_share`):
the step with each sampler in interleaved rounds, as a share of the step without augmentation.

    python benchmarks/sampling.py [--rounds 10] [--rotations] [--ways 20 --shots 1 ...]
                                  [--augment [--share-width 8]]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

import jax
import numpy as np

from metalearn.tasks import FewShotSampler, load_omniglot
from metalearn.tasks.augment import Augment


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
    p.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    p.add_argument("--jax-block", type=int, default=20, help="JAX batches per round")
    p.add_argument("--numpy-block", type=int, default=2, help="NumPy batches per round")
    p.add_argument("--rotations", action="store_true", help="rotated classes (x4) as well")
    p.add_argument("--omniglot", nargs="*", default=None, help="Omniglot folders/zips")
    p.add_argument("--augment", action="store_true",
                   help="also time affine augmentation per image and per class, and its share "
                        "of a ProtoNet meta-step")
    p.add_argument("--share-width", type=int, default=8,
                   help="--augment: CNN width of the ProtoNet meta-step")
    a = p.parse_args(argv)

    t0 = time.perf_counter()
    ds = load_omniglot(a.omniglot)
    t_load = time.perf_counter() - t0
    print(f"dataset: {ds.num_classes} classes x up to {ds.images.shape[1]} images "
          f"{ds.image_shape}, loaded in {t_load:.2f}s; peak RSS {peak_mib():.0f} MiB")
    cfg = (f"{a.ways}-way {a.shots}-shot {a.queries}-query, batch {a.batch_size}"
           f"{', rotations' if a.rotations else ''}")

    sampler = FewShotSampler(ds, a.ways, a.shots, a.queries, rotations=a.rotations)
    ours = sampler.batch_sampler(a.batch_size)  # jit (CPU: XLA loop emitters)
    plain = jax.jit(lambda s, k: s.sample_batch(k, a.batch_size))  # jit, XLA defaults
    t0 = time.perf_counter()
    jax.block_until_ready(ours(jax.random.PRNGKey(0)))
    t_compile = time.perf_counter() - t0
    augmented = {f"augment {k}": sampler.replace(augment=Augment(per_class=k == "class"))
                 .batch_sampler(a.batch_size) for k in (("image", "class") if a.augment else ())}
    for f in augmented.values():
        jax.block_until_ready(f(jax.random.PRNGKey(0)))
    jax.block_until_ready(plain(sampler, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    numpy_batch(rng, ds.images, ds.counts, a.ways, a.shots, a.queries, 1, a.rotations)
    rss_jax = peak_mib()

    def jax_block(f, r: int) -> float:
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(1), r), a.jax_block)
        t0 = time.perf_counter()
        for k in keys:
            out = f(k)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / a.jax_block

    def numpy_block() -> float:
        t0 = time.perf_counter()
        for _ in range(a.numpy_block):
            numpy_batch(rng, ds.images, ds.counts, a.ways, a.shots, a.queries, a.batch_size,
                        a.rotations)
        return (time.perf_counter() - t0) / a.numpy_block

    # interleaved rounds (a block of batches back to back per sampler): all samplers see the
    # same load when other processes share the CPU; per-batch times are medians over rounds
    times: dict[str, list[float]] = {"ours": [], "plain": [], "numpy": [],
                                     **{k: [] for k in augmented}}
    for r in range(a.rounds):
        times["ours"].append(jax_block(ours, r))
        for k, f in augmented.items():
            times[k].append(jax_block(f, r))
        times["plain"].append(jax_block(lambda k: plain(sampler, k), r))
        times["numpy"].append(numpy_block())
    med = {k: float(np.median(v)) for k, v in times.items()}
    eps = {k: a.batch_size / v for k, v in med.items()}
    batch = ours(jax.random.PRNGKey(0))
    dev_mib = sampler._rows.nbytes / 2**20
    out_mib = sum(x.nbytes for x in jax.tree.leaves(batch)) / 2**20
    line = lambda name, k: (f"{name} ({cfg}): {eps[k]:8,.0f} episodes/s (median "
                            f"{1e3 * med[k]:.1f} ms/batch, best round {1e3 * min(times[k]):.1f})")
    print(line("metalearn sampler.batch_sampler   ", "ours")
          + f"; compile {t_compile:.2f}s")
    print(line("metalearn jax.jit(sample_batch)   ", "plain"))
    print(line("NumPy per-episode loop            ", "numpy"))
    for k in augmented:
        print(line(f"metalearn batch_sampler, {k:<9}", k)
              + f"; +{1e3 * (med[k] - med['ours']):.1f} ms per batch for the distortion")
    print(f"speed-up vs NumPy: {eps['ours'] / eps['numpy']:.1f}x median "
          f"({min(times['numpy']) / min(times['ours']):.1f}x best rounds; plain jit "
          f"{eps['plain'] / eps['numpy']:.1f}x); goal >= 10x. {a.rounds} rounds of "
          f"{a.jax_block} + {a.jax_block} + {a.numpy_block} batches on "
          f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}")
    tracemalloc.start()
    numpy_batch(rng, ds.images, ds.counts, a.ways, a.shots, a.queries, a.batch_size,
                a.rotations)
    np_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    print(f"memory: metalearn holds the images on device once ({dev_mib:.1f} MiB uint8) and "
          f"returns {out_mib:.1f} MiB (float32) per batch; NumPy peaks at {np_peak:.1f} MiB "
          f"per batch; peak RSS {rss_jax:.0f} MiB after compiling, {peak_mib():.0f} MiB at the "
          "end (whole process: Python, JAX, dataset, both samplers)")
    out = {"jax_eps": eps["ours"], "jit_eps": eps["plain"], "numpy_eps": eps["numpy"],
           "speedup": eps["ours"] / eps["numpy"]}
    if a.augment:
        out["augment_share"] = augment_share(a.share_width, a.rounds)
    return out


def augment_share(width: int, rounds: int) -> dict:
    """What augmentation adds to a ProtoNet meta-step (8 episodes), printed as a share of it."""
    from protonet import sampling_share

    r = sampling_share(width, batch=8, chunk=2, rounds=rounds, augment=True)
    base = r["sampler"]
    print(f"ProtoNet meta-step, {width} channels, 20-way 1-shot 15-query, 8 episodes (medians "
          f"of {rounds} interleaved rounds of 2 steps; load average {os.getloadavg()[0]:.1f}): "
          f"{1e3 * base:.0f} ms without augmentation; sampling the 8 episodes alone "
          f"{1e3 * r['sampler alone']:.1f} ms")
    for k in ("augment image", "augment class"):
        d = r[k] - base
        print(f"  with {k[8:]:>5} augmentation: {1e3 * r[k]:.0f} ms ({1e3 * d:+.1f} ms, "
              f"{100 * d / base:+.1f}% of the step); its sampling alone "
              f"{1e3 * r[k + ' alone']:.1f} ms")
    return r


if __name__ == "__main__":
    main()

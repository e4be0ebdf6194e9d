"""Meta-training throughput and peak memory of the few-shot CNN learners (ProtoNet, MAML).

Setting: 20-way 1-shot, 15 queries per class (320 images per episode), 8 episodes per meta-step,
Adam, Omniglot 28x28 with rotations (the minimal zips in ../shared/data/omniglot; random images
of the same shape when they are absent), channel widths 8 and 64. Each width runs in its own
process so that its peak resident memory (VmHWM) is its own; XLA's own estimate of the
compiled step's buffers is printed too. `--learners protonet maml fomaml ht ht_logits` times
second-order and first-order MAML (5 inner steps on the support set, a 20-way head) and the
HyperTransformer (all layers generated, or the logits layer only) beside ProtoNet in the same run
and prints each one's time per step as a ratio to ProtoNet's (benchmarks/hypertransformer.py).

`--sampling-share` also times each width's meta-step from a pool of pre-sampled, pre-normalised
episodes on device (the cheapest possible sampler: one dynamic index per episode) against the
step with the FewShotSampler inside it, in interleaved rounds in one process, and prints how much
of a meta-step sampling takes.

When PyTorch is importable (`pip install torch==2.13.0`; never a dependency of the package), the
same ProtoNet step written in PyTorch (`benchmarks/torch_peer.py`: eager NCHW, eager
channels_last, `torch.compile` + channels_last) is checked against the JAX step on one batch
(same loss, gradients within 1e-3) and timed in its own process at each width, sampling
included on both sides; each variant's time and peak RSS are printed as ratios to ours. Times
are medians of `--repeats` calls (of `--chunk` steps; the peer: of 2 x repeats steps); with
`--rounds N` each learner runs in N fresh processes, in turn, and the median round is shown.

Every timed process runs with glibc's malloc on transparent huge pages (`--malloc hugepages`,
what the `metalearn` command sets for itself; see `metalearn.cli.hugepages_env`) unless
`--malloc default`: both frameworks take large buffers from malloc on every step, and with
4 KB pages each of them faults anew, which costs PyTorch's step about half its time here.

Usage: python benchmarks/protonet.py [--widths 8 64] [--batch 8] [--chunk 2] [--repeats 10]
                                     [--rounds 1]
                                     [--ops auto|cpu|xla] [--sampling-share]
                                     [--learners protonet maml ht ...] [--peer [VARIANT ...]]
                                     [--malloc hugepages|default]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _memory import peak_rss_mb, reset_peak_rss

from metalearn.core import Array, Episode, InnerLearner, TaskSampler
from metalearn.learners.maml import MAML
from metalearn.learners.protonet import ProtoNet
from metalearn.memory import release_free_memory
from metalearn.nn import BLOCK_ORDERS, CNN
from metalearn.outer.gradient import GradientOuterLoop


def _sampler(ways: int, shots: int, queries: int):
    """Omniglot training alphabets of the minimal protocol, or random images."""
    from metalearn.tasks.fewshot import FewShotSampler

    try:
        from metalearn.tasks.data.folders import load_omniglot
        from metalearn.tasks.data.omniglot import MINIMAL_ALPHABETS
        from metalearn.tasks.data.splits import split_by_group

        ds = split_by_group(load_omniglot(),
                            {"train": list(MINIMAL_ALPHABETS["train"])})["train"]
        source = f"Omniglot train alphabets ({ds.num_classes} x 4 rotations)"
    except FileNotFoundError:
        from metalearn.tasks.testing import synthetic_dataset

        ds = synthetic_dataset(classes=112, examples=20, size=28)
        source = "random 28x28 images (Omniglot not found)"
    return FewShotSampler(ds, ways, shots, queries, rotations=True, normalize="invert"), source


@jax.tree_util.register_pytree_node_class
class EpisodePool(TaskSampler):
    """Episodes drawn uniformly from a fixed batch already on device (no sampling work)."""

    def __init__(self, episodes: Episode):
        self.episodes = episodes

    def tree_flatten(self) -> tuple[tuple[Episode], None]:
        """The episodes are the leaves."""
        return (self.episodes,), None

    @classmethod
    def tree_unflatten(cls, aux: None, leaves: tuple[Episode]) -> EpisodePool:
        """Rebuild from the leaves."""
        return cls(*leaves)

    def sample(self, key: Array) -> Episode:
        """One of the pool's episodes."""
        n = self.episodes.support_y.shape[0]
        i = jax.random.randint(key, (), 0, n)
        return jax.tree.map(lambda a: a[i], self.episodes)


LEARNERS = ("protonet", "maml", "fomaml", "ht", "ht_logits")
DEFAULT_ORDER = next(iter(BLOCK_ORDERS))  # the learners' default CNN block


def make_learner(name: str, width: int, block_order: str = DEFAULT_ORDER) -> InnerLearner:
    """ProtoNet; (first-order) MAML with 5 inner steps and a 20-way head; the HyperTransformer
    generating all layers (ht) or the logits layer only (ht_logits, 4 trained conv blocks),
    with `ht_omniglot`'s generator settings; at one width and CNN block order."""
    if name == "protonet":
        return ProtoNet(channels=width, block_order=block_order)
    if name in ("ht", "ht_logits"):
        from metalearn.learners.hypertransformer import HyperTransformer

        return HyperTransformer(ways=20, channels=width, block_order=block_order,
                                trained_blocks=4 if name == "ht_logits" else 0)
    return MAML(CNN(width, 4, out_dim=20, block_order=block_order), inner_steps=5,
                inner_lr=0.4, first_order=name == "fomaml")


def worker(width: int, batch: int, chunk: int, ops: str,
           learner_name: str = "protonet", repeats: int = 10,
           block_order: str = DEFAULT_ORDER) -> dict:
    """Steps/s (median of `repeats` calls of `chunk` steps) and memory of one learner at one
    width (run in a fresh process)."""
    os.environ["METALEARN_OPS"] = ops  # the CNN block: metalearn.cpu_ops' kernels or XLA's
    sampler, source = _sampler(20, 1, 15)
    learner = make_learner(learner_name, width, block_order)
    outer = GradientOuterLoop(batch_size=batch, steps_per_call=chunk)
    state = outer.init(learner, sampler, jax.random.PRNGKey(0))
    rss0 = peak_rss_mb()
    fn = outer.compiled_steps(learner, sampler)
    t = time.perf_counter()
    compiled = fn.lower(state, chunk).compile()
    compile_s = time.perf_counter() - t
    release_free_memory()  # as the outer loop does after compiling
    mem = compiled.memory_analysis()
    state, m = compiled(state)  # warm-up
    jax.block_until_ready(m)
    compile_peak = reset_peak_rss()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = compiled(state)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    sec = float(np.median(times)) / chunk
    return {"learner": learner_name, "width": width, "steps_per_second": 1 / sec,
            "seconds_per_step": sec, "compile_s": compile_s,
            "peak_rss_mb": max(compile_peak, peak_rss_mb()), "stepping_rss_mb": peak_rss_mb(),
            "rss_before_compile_mb": rss0,
            "xla_temp_mb": getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20,
            "images_per_step": batch * 20 * 16, "loss": float(np.asarray(m["loss"])[-1]),
            "source": source}


def sampling_share(width: int, batch: int, chunk: int, rounds: int = 10,
                   augment: bool = False) -> dict:
    """Meta-step time with in-step sampling vs from an `EpisodePool`, interleaved rounds in one
    process (medians), and the sampling alone (`jax.jit(sample_batch)`) for comparison. With
    `augment`, also the step whose sampler distorts every image ("augment image") or every
    class ("augment class") with `tasks.augment`'s default ranges, and those samplings alone."""
    from metalearn.tasks.augment import Augment

    sampler, _ = _sampler(20, 1, 15)
    samplers = {"sampler": sampler}
    if augment:
        samplers["augment image"] = sampler.replace(augment=Augment())
        samplers["augment class"] = sampler.replace(augment=Augment(per_class=True))
    pool = EpisodePool(sampler.batch_sampler(batch)(jax.random.PRNGKey(1)))
    learner = ProtoNet(channels=width)
    outer = GradientOuterLoop(batch_size=batch, steps_per_call=chunk)
    state = outer.init(learner, sampler, jax.random.PRNGKey(0))
    steps = {name: outer.compiled_steps(learner, s).lower(state, chunk).compile()
             for name, s in (*samplers.items(), ("pool", pool))}
    alone = jax.jit(lambda s, k: s.sample_batch(k, batch))
    states = {name: jax.tree.map(jnp.copy, state) for name in steps}  # the steps donate them

    def run(name: str) -> Array:
        states[name], m = steps[name](states[name])
        return m

    fns = {name: functools.partial(run, name) for name in steps}
    for name, s in samplers.items():
        fns[f"{name} alone"] = functools.partial(alone, s, jax.random.PRNGKey(2))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds + 1):  # the first round warms up
        for name, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - t)
    per_step = {k: float(np.median(v[1:])) / (1 if k.endswith("alone") else chunk)
                for k, v in times.items()}
    return {"width": width, **per_step}


def peer_data(width: int, batch: int, path: str) -> None:
    """Write what `benchmarks/torch_peer.py` needs: the image rows it samples from, and one batch
    of episodes with the JAX ProtoNet's parameters, loss and gradients on it (to check against)."""
    from metalearn.core import batch_loss
    from metalearn.tasks.fewshot import _rows

    sampler, _ = _sampler(20, 1, 15)
    ep = sampler.sample_batch(jax.random.PRNGKey(3), batch)
    learner = ProtoNet(channels=width)
    meta = learner.init(jax.random.PRNGKey(0), jax.tree.map(lambda a: a[0], ep))
    (loss, _), grads = jax.value_and_grad(batch_loss, argnums=1, has_aux=True)(
        learner, meta, ep, jax.random.PRNGKey(1))
    arrays = {"rows": _rows(sampler.dataset.images, True),
              "examples": sampler.dataset.images.shape[1], "loss": loss,
              **{f: getattr(ep, f) for f in ("support_x", "support_y", "query_x", "query_y")}}
    for i, (blk, g) in enumerate(zip(meta["cnn"]["blocks"], grads["cnn"]["blocks"],
                                     strict=True)):
        arrays.update({f"{k}{i}": blk[k] for k in blk} | {f"d{k}{i}": g[k] for k in g})
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})


def _run(script_args: list[str]) -> dict:
    """Run a script of this folder in a fresh process; its last stdout line, parsed as JSON."""
    cmd = [sys.executable, str(Path(__file__).with_name(script_args[0])), *script_args[1:]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_worker(args: argparse.Namespace, width: int, *extra: str) -> dict:
    return _run([Path(__file__).name, "--worker", str(width), "--batch", str(args.batch),
                 "--chunk", str(args.chunk), "--repeats", str(args.repeats),
                 "--block-order", args.block_order, *extra])


def _median_run(runs: list[dict]) -> dict:
    """The run of median step time (the lower middle one of an even count), with every run's
    step time listed under "round_seconds"."""
    ordered = sorted(runs, key=lambda r: r["seconds_per_step"])
    return {**ordered[(len(ordered) - 1) // 2],
            "round_seconds": [r["seconds_per_step"] for r in runs]}


def _set_malloc(mode: str) -> None:
    """Set GLIBC_TUNABLES, which the timed subprocesses inherit, for `--malloc`."""
    from metalearn.cli import HUGEPAGES_TUNABLE, hugepages_env, thp_mode

    tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith("glibc.malloc.hugetlb")]
    os.environ["GLIBC_TUNABLES"] = ":".join(tunables)
    env = hugepages_env(os.environ, thp_mode()) if mode == "hugepages" else None
    if mode == "hugepages" and env is None:
        print(f"({HUGEPAGES_TUNABLE} not set: the kernel's THP mode is not `madvise`, or "
              "METALEARN_HUGEPAGES=0)")
    os.environ.update(env or {})


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def main() -> None:
    """Run each width in a subprocess and print a table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--batch", type=int, default=8, help="episodes per meta-step")
    ap.add_argument("--chunk", type=int, default=2, help="meta-steps per compiled call")
    ap.add_argument("--repeats", type=int, default=10,
                    help="timed calls (medians; the PyTorch peer times 2x as many steps)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="fresh processes per learner, run in turn; the median round is shown")
    ap.add_argument("--ops", default="auto", choices=("auto", "cpu", "xla"),
                    help="the CNN block: metalearn.cpu_ops' kernels (cpu; auto on a CPU) or "
                         "XLA's own convolution and pooling (xla)")
    ap.add_argument("--sampling-share", action="store_true",
                    help="also train from a pool of pre-sampled episodes; print sampling's share")
    ap.add_argument("--learners", nargs="+", default=["protonet"], choices=LEARNERS,
                    help="learners to time (ratios are to the first)")
    ap.add_argument("--peer", nargs="*", default=None,
                    help="PyTorch variants of the ProtoNet step to time beside it (default: "
                         "eager channels_last compiled when torch is importable; --peer with "
                         "no names: none)")
    ap.add_argument("--malloc", choices=("hugepages", "default"), default="hugepages",
                    help="run every timed process (ours and the PyTorch peer) with glibc's "
                         "malloc on transparent huge pages, as the metalearn command does, or "
                         "with glibc's default")
    ap.add_argument("--block-order", default=DEFAULT_ORDER, choices=list(BLOCK_ORDERS),
                    help="the CNN block of every learner (metalearn.nn.BLOCK_ORDERS)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.batch, args.chunk, args.ops,
                                args.learners[0], args.repeats, args.block_order)))
        return
    _set_malloc(args.malloc)
    peers = args.peer if args.peer is not None else (
        ["eager", "channels_last", "compiled"] if _torch_available() else [])
    print(f"devices: {jax.devices()}  (jax {jax.__version__}); 20-way 1-shot 15-query, "
          f"{args.batch} episodes per step, Adam; medians of {args.repeats} calls of "
          f"{args.chunk} steps, block {args.block_order}"
          + (f", ops={args.ops}" if args.ops != "auto" else "")
          + f"; load average {os.getloadavg()[0]:.2f}; malloc: {args.malloc} (GLIBC_TUNABLES="
          f"{os.environ.get('GLIBC_TUNABLES', '')!r})")
    if not peers and args.peer is None:
        print("(PyTorch not importable: no peer timed; `pip install torch==2.13.0` adds it)")
    for w in args.widths:
        runs: dict[str, list[dict]] = {name: [] for name in args.learners}
        for _ in range(args.rounds):  # the learners in turn, so that drifts hit each alike
            for name in args.learners:
                runs[name].append(_run_worker(args, w, "--learners", name, "--ops", args.ops))
        base = None
        for name in args.learners:
            r = _median_run(runs[name])
            base = base or r
            ratio = (f", {r['seconds_per_step'] / base['seconds_per_step']:.2f}x the time and "
                     f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x the peak RSS of "
                     f"{base['learner']}" if r is not base else "")
            print(f"{name:>8} width {w:>3}: {r['steps_per_second']:7.3f} meta-steps/s "
                  f"({r['seconds_per_step']:.3f} s/step, {r['images_per_step']} images/step), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB (before compile "
                  f"{r['rss_before_compile_mb']:.0f} MB; while stepping, after compiling: "
                  f"{r['stepping_rss_mb']:.0f} MB), XLA temp buffers "
                  f"{r['xla_temp_mb']:.0f} MB, compile {r['compile_s']:.1f} s{ratio}"
                  f"  [{r['source']}]")
            if args.rounds > 1:
                print(f"{'':>8} s/step of each round: "
                      + ", ".join(f"{t:.3f}" for t in r["round_seconds"]))
        if not (peers and base and base["learner"] == "protonet"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            data = f"{tmp}/peer.npz"
            peer_data(w, args.batch, data)
            import torch_peer  # the check runs here; the timed process only times

            with np.load(data) as f:
                checks = {v: torch_peer.check_equal(dict(f), v != "eager") for v in peers}
            for v in peers:
                d_loss, d_grad = checks[v]
                if d_loss > 1e-4 or d_grad > 1e-3:
                    raise SystemExit(f"PyTorch {v} differs from the JAX step (loss by "
                                     f"{d_loss:.2e}, gradients by up to {d_grad:.2e})")
                r = _run(["torch_peer.py", "--data", data, "--variant", v, "--width", str(w),
                          "--batch", str(args.batch), "--steps", str(2 * args.repeats)])
                print(f"{'torch ' + v:>22} width {w:>3}: {1 / r['seconds_per_step']:7.3f} "
                      f"steps/s ({r['seconds_per_step']:.3f} s/step), peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB (before the step {r['rss_before_mb']:.0f} MB"
                      f"; while stepping, after the warm-up: {r['stepping_rss_mb']:.0f} MB); "
                      f"JAX speed {r['seconds_per_step'] / base['seconds_per_step']:.2f}x, "
                      f"JAX memory {base['peak_rss_mb'] / r['peak_rss_mb']:.2f}x (stepping "
                      f"{base['stepping_rss_mb'] / r['stepping_rss_mb']:.2f}x) [torch "
                      f"{r['torch']}, {r['threads']} threads, median of {2 * args.repeats} steps"
                      f"; same loss within {d_loss:.1e}, gradients within {d_grad:.1e}]")
    for w in args.widths if args.sampling_share else []:
        r = sampling_share(w, args.batch, args.chunk)
        d = r["sampler"] - r["pool"]
        print(f"width {w:>3}: meta-step {1e3 * r['sampler']:.0f} ms with in-step sampling, "
              f"{1e3 * r['pool']:.0f} ms from a pool of pre-sampled episodes: sampling "
              f"{1e3 * d:+.1f} ms ({100 * d / r['sampler']:+.1f}%, medians of 10 interleaved "
              f"rounds); sampling {args.batch} episodes alone: {1e3 * r['sampler alone']:.1f} ms")

if __name__ == "__main__":
    main()

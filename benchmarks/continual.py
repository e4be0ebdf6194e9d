"""One unrolled T-task Continual HyperTransformer meta-step against T HyperTransformer steps.

Setting (`cht_omniglot`'s): 5-way 5-shot tasks with 5 queries per class, an 8-channel 3-block
CNN with every conv layer generated, Adam, one sequence per meta-step. Timed, each as the
gradient outer loop's compiled steps (sampling included, medians of `--repeats` calls of
`--chunk` steps):
- `cht`: one meta-step on a sequence of T tasks (the recursion and the loss of theta_t on the
  queries of tasks 0..t, backpropagated through all T generations);
- `cht_1`: the same learner with T = 1 (a HyperTransformer with a prototypical head);
- `ht`: the HyperTransformer with its generated logits layer on one 5-way episode.
Printed: seconds per step and the ratio of one `cht` step to T steps of `cht_1` and of `ht`.
Images: Omniglot's Vinyals training characters when the full set is present, else random ones.

Usage: python benchmarks/continual.py [--tasks 5] [--chunk 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from metalearn.learners.continual import ContinualHyperTransformer
from metalearn.learners.hypertransformer import HyperTransformer
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.continual import ContinualSampler
from metalearn.tasks.fewshot import FewShotSampler

GENERATOR = dict(channels=8, num_blocks=3)


def _images() -> tuple[object, str]:
    try:
        from metalearn.tasks.data.omniglot import load_protocol, protocol_split

        ds = protocol_split(load_protocol("vinyals"), "vinyals")["train"]
        return ds, f"full Omniglot, Vinyals training characters ({ds.num_classes})"
    except FileNotFoundError:
        from metalearn.tasks.testing import synthetic_dataset

        return synthetic_dataset(classes=200, examples=20, size=28), "random 28x28 images"


def seconds_per_step(learner, sampler, chunk: int, repeats: int) -> tuple[float, float]:
    """(median seconds per meta-step, compile seconds) of the gradient loop's compiled steps."""
    outer = GradientOuterLoop(batch_size=1, steps_per_call=chunk)
    state = outer.init(learner, sampler, jax.random.PRNGKey(0))
    t = time.perf_counter()
    fn = outer.compiled_steps(learner, sampler).lower(state, chunk).compile()
    compile_s = time.perf_counter() - t
    state, m = fn(state)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, m = fn(state)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / chunk, compile_s


def main() -> None:
    """Time the three steps and print the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--chunk", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    ds, source = _images()
    base = FewShotSampler(ds, 5, 5, 5, rotations=True, normalize="invert")
    rows = {
        "cht": (ContinualHyperTransformer(ways=5, tasks=a.tasks, **GENERATOR),
                ContinualSampler(base, a.tasks)),
        "cht_1": (ContinualHyperTransformer(ways=5, tasks=1, **GENERATOR),
                  ContinualSampler(base, 1)),
        "ht": (HyperTransformer(ways=5, **GENERATOR), base),
    }
    print(f"images: {source}; 5-way 5-shot, 5 queries per class, T = {a.tasks}; "
          f"{jax.devices()[0].device_kind}")
    sec = {}
    for name, (learner, sampler) in rows.items():
        sec[name], compile_s = seconds_per_step(learner, sampler, a.chunk, a.repeats)
        print(f"  {name:<6} {1e3 * sec[name]:8.1f} ms/step   (compile {compile_s:.0f} s)",
              flush=True)
    for ref in ("cht_1", "ht"):
        print(f"one T={a.tasks} cht step / {a.tasks} {ref} steps: "
              f"{sec['cht'] / (a.tasks * sec[ref]):.2f}")


if __name__ == "__main__":
    main()

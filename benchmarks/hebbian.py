"""Speed of the multi-state Hebbian rule (BLUR).

Prints
  * inner steps/s of the rule (k = 2, forward + feedback + backward + Hebbian update of both
    synapse blocks) on a 784-100-10 network at batch 32, beside one `jax.grad` + SGD step of
    the same MLP in the same run, and their ratio (goal: the rule costs at most 2x);
  * gradient meta-steps/s and CMA-ES generations/s (population 32) of `hebbian_omniglot`'s
    setting (5-way, 50 support images, T = 10, 784-100-5, batch of 8 episodes).

Usage: python benchmarks/hebbian.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from metalearn.learners.hebbian import HebbianLearner
from metalearn.outer.evolution import EvolutionOuterLoop
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.fewshot import FewShotSampler
from metalearn.tasks.functions2d import Functions2D
from metalearn.tasks.testing import synthetic_dataset


def _median_seconds(fn, repeats: int, rounds: int = 5) -> float:
    """Median over `rounds` of the seconds per call of fn() (after a warm-up call)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / repeats)
    return statistics.median(times)


def inner_steps(repeats: int) -> tuple[float, float]:
    """(rule steps/s, SGD steps/s) on 784-100-10 at batch 32; each call runs 10 steps."""
    learner = HebbianLearner(ways=10, hidden=(100,))
    genome = learner.named_meta("gradient:0.01")
    syn = learner.init_state(genome, jax.random.PRNGKey(0), 784)
    x = jax.random.uniform(jax.random.PRNGKey(1), (32, 784))
    y = learner.codes(jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 10))
    steps = 10

    @jax.jit
    def rule(syn):
        return jax.lax.fori_loop(0, steps, lambda t, s: learner.update(genome, s, x, y, t), syn)

    ws = [s["F"][0] for s in syn]

    def mlp_loss(ws):
        a = x
        for c, w in enumerate(ws):
            z = a @ w[:-1] + w[-1]
            a = jnp.tanh(z) if c == len(ws) - 1 else jax.nn.relu(jnp.tanh(z))
        return 0.5 * jnp.sum((a - y) ** 2)

    @jax.jit
    def sgd(ws):
        def step(t, w):
            g = jax.grad(mlp_loss)(w)
            return [wi - 0.01 * gi for wi, gi in zip(w, g, strict=True)]
        return jax.lax.fori_loop(0, steps, step, ws)

    t_rule = _median_seconds(lambda: rule(syn), repeats) / steps
    t_sgd = _median_seconds(lambda: sgd(ws), repeats) / steps
    return 1 / t_rule, 1 / t_sgd


def outer_steps(sampler, learner, repeats: int, evolution: bool = True
                ) -> tuple[float, float | None]:
    """(gradient meta-steps/s, CMA-ES generations/s at population 32, or None without
    `evolution`)."""
    out: list = []
    loops = [GradientOuterLoop(batch_size=8, steps_per_call=5, clip_norm=1.0)]
    if evolution:
        loops.append(EvolutionOuterLoop(strategy="CMA_ES", population_size=32, batch_size=8,
                                        steps_per_call=5))
    for outer in loops:
        fn = outer.compiled_steps(learner, sampler)
        state = [outer.init(learner, sampler, jax.random.PRNGKey(0))]

        def call(fn=fn, state=state):
            state[0], m = fn(jax.tree.map(jnp.copy, state[0]), 5)
            return m
        out.append(5 / _median_seconds(call, repeats, rounds=3))
    return out[0], (out[1] if evolution else None)


def start(doc: str) -> argparse.Namespace:
    """The command line (--quick) of a benchmark described by `doc`; prints the JAX version,
    the platform and the load average."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, load average "
          f"{os.getloadavg()[0]:.2f}")
    return args


def image_tasks() -> FewShotSampler:
    """Synthetic stand-ins for `hebbian_omniglot`'s tasks: 5-way, 10 + 10 images of 28x28."""
    return FewShotSampler(synthetic_dataset(classes=40, examples=20, size=28), 5, 10, 10,
                          normalize="invert")


def main() -> None:
    """Print the figures."""
    args = start(__doc__)
    reps = 3 if args.quick else 20
    rule, sgd = inner_steps(reps)
    print(f"inner steps/s, 784-100-10, batch 32: rule (k=2) {rule:,.0f}   jax.grad + SGD "
          f"{sgd:,.0f}   rule costs {sgd / rule:.2f}x an SGD step (goal <= 2x)")
    images = image_tasks()
    learner = HebbianLearner(ways=5, hidden=(100,), inner_steps=10)
    gd, es = outer_steps(images, learner, 1 if args.quick else 3)
    print(f"hebbian_omniglot setting (5-way, 50 support images, T=10, 784-100-5, 8 episodes): "
          f"gradient {gd:.2f} meta-steps/s   CMA-ES (population 32) {es:.3f} generations/s")
    two_d = Functions2D(families=("xor", "or"), num_support=64, num_queries=64)
    gd, es = outer_steps(two_d, HebbianLearner(hidden=(20,), inner_steps=5), reps)
    print(f"hebbian_2d setting (2-20-2, 64 points, T=5, 8 episodes): gradient {gd:.1f} "
          f"meta-steps/s   CMA-ES (population 32) {es:.2f} generations/s")


if __name__ == "__main__":
    main()

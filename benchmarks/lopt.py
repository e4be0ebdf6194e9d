"""Speed of the learned optimizers' inner step against Adam's, and of their meta-training.

Prints
  * inner steps/s of MLPLOpt, AdafacLOpt and optax Adam training the same 784-100-5 MLP
    (`lopt_omniglot`'s network: tanh hidden units, linear outputs, squared error to the target
    codes) on the same full batch of 50 support images, one task and 8 tasks at once (vmap),
    and each learned optimizer's cost in Adam steps (goal: at most 3x), the optimizers timed
    in turn, round after round, and the cost the median of the rounds' ratios;
  * gradient meta-steps/s (backprop through T = 10 steps, 8 tasks) and, for AdafacLOpt, CMA-ES
    generations/s (population 32) of `lopt_omniglot`'s setting.

Usage: python benchmarks/lopt.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hebbian import (  # noqa: E402  (benchmarks/hebbian.py, next to this file)
    image_tasks,
    outer_steps,
    start,
)

from metalearn.learners.lopt import AdafacLOpt, MLPLOpt  # noqa: E402
from metalearn.learners.network import GradientBaseline  # noqa: E402

NET = dict(ways=5, hidden=(100,), inner_steps=10, hidden_activation="tanh",
           output_activation="identity", meta_loss="cross_entropy")
STEPS = 10  # inner steps a timed call runs


def inner_call(learner, meta, tasks: int):
    """A compiled, warmed-up call running STEPS inner steps of `learner` on `tasks` tasks at
    once (50 support images each)."""
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(jax.random.PRNGKey(1), (tasks, 50, 784))
    y = learner.codes(jax.random.randint(jax.random.PRNGKey(2), (tasks, 50), 0, 5))
    states = jax.vmap(lambda k: learner.init_state(meta, k, 784))(jax.random.split(key, tasks))

    def run(state, x, y):
        return jax.lax.fori_loop(0, STEPS, lambda t, s: learner.update(meta, s, x, y, t), state)

    fn = jax.jit(jax.vmap(run))
    jax.block_until_ready(fn(states, x, y))
    return lambda: jax.block_until_ready(fn(states, x, y))


def interleaved_seconds(calls: dict, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each call, `rounds` times, the calls taking turns within a round
    (so that a slow spell of the machine falls on all of them, not on one)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            times[name].append((time.perf_counter() - t) / repeats)
    return times


def _ratio(times: list[float], adam: list[float]) -> float:
    return statistics.median(t / a for t, a in zip(times, adam, strict=True))


def main() -> None:
    """Print the figures."""
    args = start(__doc__)
    reps, rounds = (3, 9) if args.quick else (10, 21)
    images = image_tasks()
    example = images.example()
    adam = GradientBaseline(optimizer="adam", **NET)
    learners = {"Adam": (adam, {"learning_rate": jnp.float32(0.01)})}
    for cls in (AdafacLOpt, MLPLOpt):
        lopt = cls(**NET)
        learners[cls.__name__] = (lopt, lopt.init(jax.random.PRNGKey(0), example))
    for tasks in (1, 8):
        calls = {name: inner_call(lrn, meta, tasks) for name, (lrn, meta) in learners.items()}
        times = interleaved_seconds(calls, rounds, reps)
        print(f"inner steps/s, 784-100-5, 50 support images, {tasks} task(s) at once "
              f"(median of {rounds} rounds): " + "   ".join(
                  f"{name} {STEPS / statistics.median(t):,.0f}" for name, t in times.items()))
        print("  cost in Adam steps, median of the rounds' ratios (goal <= 3x): " +
              "   ".join(f"{name} {_ratio(t, times['Adam']):.2f}x" for name, t in
                         times.items() if name != "Adam"))
    for name in ("AdafacLOpt", "MLPLOpt"):
        gd, es = outer_steps(images, learners[name][0], 1 if args.quick else 3,
                             evolution=name == "AdafacLOpt")
        es_text = f"   CMA-ES (population 32) {es:.3f} generations/s" if es else ""
        print(f"lopt_omniglot setting ({name}, T=10, 8 episodes): gradient {gd:.2f} "
              f"meta-steps/s{es_text}")


if __name__ == "__main__":
    main()

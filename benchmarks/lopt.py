"""Speed of the learned optimizers' inner step against Adam's, and of their meta-training.

Prints
  * inner steps/s of MLPLOpt, AdafacLOpt and optax Adam training the same 784-100-5 MLP
    (`lopt_omniglot`'s network: tanh hidden units, linear outputs, squared error to the target
    codes) on the same full batch of 50 support images, one task and 8 tasks at once (vmap),
    and each learned optimizer's cost in Adam steps (goal: at most 3x);
  * gradient meta-steps/s (backprop through T = 10 steps, 8 tasks) and, for AdafacLOpt, CMA-ES
    generations/s (population 32) of `lopt_omniglot`'s setting.

Usage: python benchmarks/lopt.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hebbian import (  # noqa: E402  (benchmarks/hebbian.py, next to this file)
    _median_seconds,
    image_tasks,
    outer_steps,
    start,
)

from metalearn.learners.hebbian import GradientBaseline  # noqa: E402
from metalearn.learners.lopt import AdafacLOpt, MLPLOpt  # noqa: E402

NET = dict(ways=5, hidden=(100,), inner_steps=10, hidden_activation="tanh",
           output_activation="identity", meta_loss="cross_entropy")
STEPS = 10  # inner steps a timed call runs


def inner_steps(learner, meta, tasks: int, repeats: int) -> float:
    """Inner steps/s of `learner` on `tasks` tasks at once (50 support images each)."""
    key = jax.random.PRNGKey(0)
    x = jax.random.uniform(jax.random.PRNGKey(1), (tasks, 50, 784))
    y = learner.codes(jax.random.randint(jax.random.PRNGKey(2), (tasks, 50), 0, 5))
    states = jax.vmap(lambda k: learner.init_state(meta, k, 784))(jax.random.split(key, tasks))

    def run(state, x, y):
        return jax.lax.fori_loop(0, STEPS, lambda t, s: learner.update(meta, s, x, y, t), state)

    fn = jax.jit(jax.vmap(run))
    return STEPS / _median_seconds(lambda: fn(states, x, y), repeats)


def main() -> None:
    """Print the figures."""
    args = start(__doc__)
    reps = 3 if args.quick else 20
    images = image_tasks()
    example = images.example()
    adam = GradientBaseline(optimizer="adam", **NET)
    learners = {"Adam": (adam, {"learning_rate": jnp.float32(0.01)})}
    for cls in (AdafacLOpt, MLPLOpt):
        lopt = cls(**NET)
        learners[cls.__name__] = (lopt, lopt.init(jax.random.PRNGKey(0), example))
    for tasks in (1, 8):
        rates = {name: inner_steps(lrn, meta, tasks, reps) for name, (lrn, meta) in
                 learners.items()}
        print(f"inner steps/s, 784-100-5, 50 support images, {tasks} task(s) at once: " +
              "   ".join(f"{name} {r:,.0f}" for name, r in rates.items()))
        print("  cost in Adam steps (goal <= 3x): " + "   ".join(
            f"{name} {rates['Adam'] / r:.2f}x" for name, r in rates.items() if name != "Adam"))
    for name in ("AdafacLOpt", "MLPLOpt"):
        gd, es = outer_steps(images, learners[name][0], 1 if args.quick else 3,
                             evolution=name == "AdafacLOpt")
        es_text = f"   CMA-ES (population 32) {es:.3f} generations/s" if es else ""
        print(f"lopt_omniglot setting ({name}, T=10, 8 episodes): gradient {gd:.2f} "
              f"meta-steps/s{es_text}")


if __name__ == "__main__":
    main()

"""Outer-loop throughput: gradient meta-steps/s, ES generations/s, and overhead ratios.

Prints
  * meta-steps/s of the gradient loop (MAML on a linear model, linear regression,
    batch of episodes);
  * generations/s of the evolution loop for several evosax strategies;
  * our evolution loop's time per generation / a bare evosax ask-fitness-tell Python loop on
    the same fitness (goal: <= 1.1);
  * vmapped population evaluation time / a Python loop over population members.

Usage: python benchmarks/outer_loops.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from metalearn.core import batch_loss
from metalearn.learners.maml import MAML
from metalearn.nn import Linear
from metalearn.outer.evolution import EvolutionOuterLoop
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.regression import LinearRegression


def _block(tree) -> None:
    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, tree)


def _time(fn, repeats: int) -> float:
    """Best-of-3 seconds per call of fn() (after one warm-up call)."""
    _block(fn())
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        _block(out)
        best = min(best, (time.perf_counter() - t) / repeats)
    return best


def bench_gradient(learner, tasks, batch: int, chunk: int) -> float:
    """Meta-steps per second of the compiled gradient loop."""
    outer = GradientOuterLoop(batch_size=batch, steps_per_call=chunk)
    fn = outer.compiled_steps(learner, tasks)
    state = [outer.init(learner, tasks, jax.random.PRNGKey(0))]

    def call():
        state[0], m = fn(state[0], chunk)
        return m

    return chunk / _time(call, 3)


def bench_es(learner, tasks, strategy: str, pop: int, batch: int, chunk: int) -> float:
    """Seconds per generation of our compiled evolution loop."""
    outer = EvolutionOuterLoop(strategy=strategy, population_size=pop, batch_size=batch,
                               steps_per_call=chunk)
    fn = outer.compiled_steps(learner, tasks)
    state = [outer.init(learner, tasks, jax.random.PRNGKey(0))]

    def call():
        state[0], m = fn(state[0], chunk)
        return m

    return _time(call, 3) / chunk


def bench_bare_evosax(learner, tasks, strategy: str, pop: int, batch: int, gens: int) -> float:
    """Seconds per generation of a plain evosax loop: jitted ask, fitness, tell per generation."""
    outer = EvolutionOuterLoop(strategy=strategy, population_size=pop, batch_size=batch)
    meta0 = learner.init(jax.random.PRNGKey(0), tasks.example())
    es = outer.es(meta0)
    params = outer.es_params(es)
    sample = jax.jit(tasks.sample_batch, static_argnums=1)

    @jax.jit
    def fitness(population, episodes, key):
        return jax.vmap(lambda m: batch_loss(learner, m, episodes, key)[0])(population)

    st = [es.init(jax.random.PRNGKey(1), meta0, params), jax.random.PRNGKey(2)]

    def run():
        s, key = st
        for _ in range(gens):
            key, k1, k2, k3, k4 = jax.random.split(key, 5)
            population, s = es.ask(k1, s, params)
            fit = fitness(population, sample(k2, batch), k3)
            s, _ = es.tell(k4, population, fit, s, params)
        st[:] = [s, key]
        return s.mean

    return _time(run, 1) / gens


def bench_population_eval(learner, tasks, pop: int, batch: int) -> tuple[float, float]:
    """(vmapped seconds, Python-loop seconds) to evaluate a population's fitness once."""
    outer = EvolutionOuterLoop(population_size=pop, batch_size=batch)
    meta0 = learner.init(jax.random.PRNGKey(0), tasks.example())
    population = jax.tree.map(
        lambda a: a + 0.01 * jax.random.normal(jax.random.PRNGKey(1), (pop, *a.shape)), meta0)
    episodes = tasks.sample_batch(jax.random.PRNGKey(2), batch)
    key = jax.random.PRNGKey(3)
    vm = jax.jit(lambda p: outer.population_fitness(learner, p, episodes, key))
    one = jax.jit(lambda m: batch_loss(learner, m, episodes, key)[0])
    members = [jax.tree.map(lambda a, i=i: a[i], population) for i in range(pop)]
    t_vmap = _time(lambda: vm(population), 5)
    t_loop = _time(lambda: jnp.stack([one(m) for m in members]), 2)
    return t_vmap, t_loop


def main() -> None:
    """Run all benchmarks and print their figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke run)")
    args = ap.parse_args()
    tasks = LinearRegression(dim=10, num_context=10, num_queries=10, weight_mean=1.0)
    learner = MAML(Linear(), inner_steps=5, lr_mode="scalar")
    pop, batch, chunk = (16, 16, 20) if args.quick else (64, 32, 100)
    print(f"devices: {jax.devices()}  (jax {jax.__version__})")
    print(f"task: linear regression d=10, N=10, Q=10; learner: MAML on a linear model "
          f"(5 inner steps); "
          f"episodes per step: {batch}")
    sps = bench_gradient(learner, tasks, batch, chunk)
    print(f"gradient loop (adam):            {sps:10.1f} meta-steps/s")
    for strategy in ("Sep_CMA_ES", "CMA_ES", "Open_ES"):
        t = bench_es(learner, tasks, strategy, pop, batch, chunk)
        print(f"evolution loop {strategy:<11} pop {pop}: {1 / t:10.1f} generations/s")
    for strategy in ("Sep_CMA_ES", "Open_ES"):
        ours = bench_es(learner, tasks, strategy, pop, batch, chunk)
        bare = bench_bare_evosax(learner, tasks, strategy, pop, batch, 50 if args.quick else 200)
        print(f"ours / bare evosax loop ({strategy}): {ours / bare:6.3f}  "
              f"({ours * 1e3:.3f} ms vs {bare * 1e3:.3f} ms per generation; goal <= 1.1)")
    t_vmap, t_loop = bench_population_eval(learner, tasks, pop, batch)
    print(f"population evaluation, vmap / Python loop over {pop} members: "
          f"{t_vmap / t_loop:6.4f}  ({t_vmap * 1e3:.3f} ms vs {t_loop * 1e3:.3f} ms)")


if __name__ == "__main__":
    main()

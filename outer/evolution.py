"""Evolution-strategy meta-training with evosax (which minimises).

Fitness of a population member = its mean query loss on the batch of episodes drawn for that
generation; every member sees the same episodes. The population is evaluated with `vmap` (and
sharded across devices when there are several), never in a Python loop.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from metalearn.core import Array, InnerLearner, MetaParams, PyTree, TaskSampler, batch_loss
from metalearn.outer.base import OuterLoop, OuterState, option, shard_leading

# Strategies whose memory grows as d x d (full covariance / rotation matrices).
FULL_COVARIANCE = ("CMA_ES", "iAMaLGaM_Full", "xNES", "MA_ES", "Rm_ES", "CMAAnchoredLES")
# Strategies that follow a gradient estimate and step their mean with Adam(`learning_rate`),
# their noise held at `std_init` (where the strategy takes a schedule for it).
ADAM_STRATEGIES = ("Open_ES", "PGPE", "ARS", "ASEBO", "GuidedES", "ESMC", "PersistentES",
                   "NoiseReuseES")
DEFAULT_ES_LEARNING_RATE = 0.01


def strategy_names() -> list[str]:
    """Names of the evosax strategies that can be chosen."""
    from evosax.algorithms import distribution_based_algorithms

    return sorted(distribution_based_algorithms)


@dataclasses.dataclass
class EvolutionOuterLoop(OuterLoop):
    """An evosax distribution-based strategy on the batch-mean query loss as fitness."""

    strategy: str = option("Sep_CMA_ES", "evosax distribution-based strategy, e.g. Sep_CMA_ES, "
                           "CMA_ES, Open_ES, SNES, PGPE (see metalearn.outer.evolution)")
    population_size: int = option(32, "candidates per generation")
    std_init: float = option(0.1, "initial search standard deviation (held fixed for "
                             "Adam-stepped strategies)")
    learning_rate: float | None = option(
        None, "Adam rate of the mean for Open_ES, PGPE, ARS, ASEBO, GuidedES, ESMC, "
        "PersistentES, NoiseReuseES (None: 0.01); refused for the others")
    max_full_covariance_dim: int = option(5000, "refuse full-covariance strategies above this "
                                          "many meta-parameters")
    batch_size: int = 32  # episodes per generation, shared by all members
    steps_per_call: int = 10
    shard: bool | None = None

    def __post_init__(self) -> None:
        names = strategy_names()
        if self.strategy not in names:
            raise ValueError(f"unknown evosax strategy {self.strategy!r}; choose one of "
                             f"{', '.join(names)}")
        if self.population_size < 2:
            raise ValueError(f"population_size must be >= 2, got {self.population_size}")
        if self.strategy == "Open_ES" and self.population_size % 2:
            raise ValueError(f"Open_ES uses antithetic pairs: population_size must be even, "
                             f"got {self.population_size}")
        if self.std_init <= 0:
            raise ValueError(f"std_init must be > 0, got {self.std_init}")
        if self.learning_rate is not None and self.strategy not in ADAM_STRATEGIES:
            raise ValueError(
                f"learning_rate={self.learning_rate} is for strategies that step their mean with "
                f"Adam ({', '.join(ADAM_STRATEGIES)}); {self.strategy} has no learning rate: "
                "leave it unset (None), or tune std_init / population_size instead")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    def remedy(self) -> str:
        """A smaller search step size (and Adam rate, for the strategies that have one)."""
        out = f"a smaller search step (--set outer.evolution.std_init=..., now {self.std_init:g})"
        if self.strategy in ADAM_STRATEGIES:
            lr = self.learning_rate or DEFAULT_ES_LEARNING_RATE
            out += f" or Adam rate (--set outer.evolution.learning_rate=..., now {lr:g})"
        return out

    def es(self, solution: PyTree):
        """The evosax strategy object for meta-parameters shaped like `solution`."""
        from evosax import algorithms

        dim = sum(int(jnp.size(x)) for x in jax.tree.leaves(solution))
        if self.strategy in FULL_COVARIANCE and dim > self.max_full_covariance_dim:
            gib = 4 * dim * dim / 2**30
            raise ValueError(
                f"{self.strategy} keeps a {dim} x {dim} covariance ({gib:.1f} GiB in float32, "
                f"O(d^3) work per generation), above max_full_covariance_dim="
                f"{self.max_full_covariance_dim}. Use strategy='Sep_CMA_ES' (diagonal "
                "covariance) or 'Open_ES' for this many meta-parameters, or raise "
                "outer.max_full_covariance_dim if you have the memory")
        cls = getattr(algorithms, self.strategy)
        kw = {}
        if self.strategy in ADAM_STRATEGIES:
            accepted = inspect.signature(cls.__init__).parameters
            kw = {k: v for k, v in (
                ("optimizer", optax.adam(self.learning_rate or DEFAULT_ES_LEARNING_RATE)),
                ("std_schedule", optax.constant_schedule(self.std_init))) if k in accepted}
        return cls(population_size=self.population_size, solution=solution, **kw)

    def es_params(self, es):
        """Strategy hyper-parameters, with `std_init` applied where the strategy has one."""
        params = es.default_params
        if hasattr(params, "std_init"):
            params = params.replace(std_init=jnp.asarray(self.std_init, jnp.float32))
        return params

    def init(self, learner: InnerLearner, sampler: TaskSampler, key: Array) -> OuterState:
        """The strategy's state, its mean at the learner's initial meta-parameters."""
        k_init, rest = jax.random.split(key)  # same init key as the gradient loop
        k_es, k_run = jax.random.split(rest)
        meta0 = learner.init(k_init, sampler.example())
        es = self.es(meta0)
        es_state = es.init(k_es, meta0, self.es_params(es))
        es_state = jax.tree.map(jnp.asarray, es_state)
        return OuterState(jnp.asarray(0, jnp.int32), k_run, meta0, es_state)

    def fitness(self, learner: InnerLearner, population: PyTree, episodes, key: Array) -> Array:
        """Mean query loss of every member (leading axis) on the same episodes."""
        f = jax.vmap(lambda m: batch_loss(learner, m, episodes, key)[0])(population)
        return jnp.where(jnp.isnan(f), jnp.inf, f)

    def step(self, learner: InnerLearner, sampler: TaskSampler, state: OuterState,
             mesh: Mesh | None = None) -> tuple[OuterState, dict]:
        """ask -> vmapped fitness on a shared batch of episodes -> tell."""
        if mesh is not None and self.population_size % mesh.size:
            raise ValueError(f"population_size={self.population_size} must be divisible by "
                             f"the {mesh.size} devices it is sharded across")
        es = self.es(state.params)
        params = self.es_params(es)
        k = jax.random.fold_in(state.key, state.step)
        k_ask, k_sample, k_loss, k_tell = jax.random.split(k, 4)
        population, es_state = es.ask(k_ask, state.opt_state, params)
        population = shard_leading(population, mesh)
        episodes = sampler.sample_batch(k_sample, self.batch_size)
        fit = self.fitness(learner, population, episodes, k_loss)
        es_state, _ = es.tell(k_tell, population, fit, es_state, params)
        mean_ok = jnp.all(jnp.isfinite(es_state.mean))
        best = jnp.min(fit)
        finite = jnp.isfinite(fit)
        metrics = {
            "loss": jnp.where(mean_ok, best, jnp.nan),
            "fitness_mean": jnp.sum(jnp.where(finite, fit, 0.0)) / jnp.maximum(finite.sum(), 1),
            "fitness_best_so_far": es_state.best_fitness,
            "std": jnp.mean(jnp.asarray(es_state.std)),
        }
        return OuterState(state.step + 1, state.key, state.params, es_state), metrics

    def meta_params(self, state: OuterState) -> MetaParams:
        """The strategy's mean, as a meta-parameter pytree."""
        return self.es(state.params).get_mean(state.opt_state)

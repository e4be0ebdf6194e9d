"""Evolution-strategy meta-training with evosax (which minimises).

Fitness of a population member = its mean query loss on the batch of episodes drawn for that
generation (or another metric the learner reports: `fitness="error"` is 1 - accuracy); every
member sees the same episodes. The logged `loss` (and accuracy) is that of the
deployed meta-parameters, the strategy's mean, on the same batch, as the gradient loop logs its
parameters'; the best member's is `best_member_loss`. The population is evaluated with `vmap` (and
sharded across devices when there are several), never in a Python loop.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from metalearn.core import Array, InnerLearner, MetaParams, PyTree, TaskSampler, batch_loss
from metalearn.messages import setting
from metalearn.outer.base import (
    OuterLoop,
    OuterState,
    initial_meta,
    option,
    shard_leading,
)
from metalearn.outer.registry import register

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


@register("evolution")
@dataclasses.dataclass
class EvolutionOuterLoop(OuterLoop):
    """An evosax distribution-based strategy on the batch-mean query loss as fitness.

    `strategy` is a name (with `population_size`, `std_init`, `learning_rate`) or an evosax
    strategy of your own, built for meta-parameters shaped like the learner's, with its params
    in `strategy_params` (default: the strategy's `default_params`), e.g.
    `EvolutionOuterLoop(strategy=evosax.algorithms.CMA_ES(population_size=16,
    solution=learner.init(key, sampler.example())))`.
    """

    strategy: Any = option("Sep_CMA_ES", "evosax distribution-based strategy, e.g. Sep_CMA_ES, "
                           "CMA_ES, Open_ES, SNES, PGPE (see metalearn.outer.evolution); in "
                           "Python also a strategy instance")
    population_size: int = option(32, "candidates per generation")
    std_init: float = option(0.1, "initial search standard deviation (held fixed for "
                             "Adam-stepped strategies)")
    learning_rate: float | None = option(
        None, "Adam rate of the mean for Open_ES, PGPE, ARS, ASEBO, GuidedES, ESMC, "
        "PersistentES, NoiseReuseES (None: 0.01); refused for the others")
    max_full_covariance_dim: int = option(5000, "refuse full-covariance strategies above this "
                                          "many meta-parameters")
    strategy_params: Any = option(None, "in Python: the params of a strategy instance (None: "
                                  "its default_params)")
    fitness: str = option("loss", "what the strategy minimises: loss, error (1 - accuracy) or "
                          "any metric the learner reports; -NAME maximises NAME")
    batch_size: int = 32  # episodes per generation, shared by all members
    steps_per_call: int = 10
    shard: bool | None = None

    @property
    def custom(self) -> bool:
        """True when `strategy` is an evosax object rather than a name."""
        return not isinstance(self.strategy, str)

    def __post_init__(self) -> None:
        if not isinstance(self.fitness, str) or not self.fitness.lstrip("-"):
            raise ValueError(f"fitness must name a metric (loss, error or one the learner "
                             f"reports), got {self.fitness!r}")
        if self.custom:
            self._check_instance()
            return
        if self.strategy_params is not None:
            raise ValueError("strategy_params go with a strategy instance; with a named strategy "
                             "set std_init / learning_rate / population_size instead")
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

    def _check_instance(self) -> None:
        from evosax.algorithms.distribution_based.base import DistributionBasedAlgorithm

        if not isinstance(self.strategy, DistributionBasedAlgorithm):
            raise TypeError(f"strategy must be a name or an evosax distribution-based strategy "
                            f"(it deploys the mean), got {type(self.strategy).__name__}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        named = [k for k in ("std_init", "learning_rate") if getattr(self, k) != defaults[k]]
        if named:
            raise ValueError(f"{', '.join(named)} set, but the strategy is an evosax object: "
                             "those fields configure named strategies; set them in the "
                             "strategy or its params (strategy_params=...)")
        pop = self.strategy.population_size
        if self.population_size not in (pop, defaults["population_size"]):
            raise ValueError(f"population_size={self.population_size}, but the strategy was "
                             f"built with population_size={pop}; leave it unset")
        self.population_size = pop

    def remedy(self) -> str:
        """A smaller search step size (and Adam rate, for the strategies that have one)."""
        if self.custom:
            return "a smaller search step (std_init) or rate in your strategy's params"
        out = (f"a smaller search step ({setting('std_init', 'outer.evolution.std_init')}, now "
               f"{self.std_init:g})")
        if self.strategy in ADAM_STRATEGIES:
            lr = self.learning_rate or DEFAULT_ES_LEARNING_RATE
            out += (f" or Adam rate ({setting('learning_rate', 'outer.evolution.learning_rate')}"
                    f", now {lr:g})")
        return out

    def es(self, solution: PyTree):
        """The evosax strategy object for meta-parameters shaped like `solution`."""
        from evosax import algorithms

        if self.custom:
            want = jax.tree.map(jnp.shape, solution)
            got = jax.tree.map(jnp.shape, self.strategy.solution)
            if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
                raise ValueError(
                    f"the evosax strategy was built for a solution of "
                    f"{self.strategy.num_dims} numbers shaped differently from the learner's "
                    f"meta-parameters ({sum(int(jnp.size(x)) for x in jax.tree.leaves(solution))}"
                    " numbers); build it with solution=learner.init(key, sampler.example())")
            return self.strategy
        dim = sum(int(jnp.size(x)) for x in jax.tree.leaves(solution))
        if self.strategy in FULL_COVARIANCE and dim > self.max_full_covariance_dim:
            gib = 4 * dim * dim / 2**30
            raise ValueError(
                f"{self.strategy} keeps a {dim} x {dim} covariance ({gib:.1f} GiB in float32, "
                f"O(d^3) work per generation), above max_full_covariance_dim="
                f"{self.max_full_covariance_dim}. Use "
                f"{setting('strategy', 'outer.evolution.strategy', 'Sep_CMA_ES')} (diagonal "
                "covariance) or Open_ES for this many meta-parameters, or raise "
                f"{setting('max_full_covariance_dim', 'outer.evolution.max_full_covariance_dim')}"
                " if you have the memory")
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
        if self.custom:
            return es.default_params if self.strategy_params is None else self.strategy_params
        params = es.default_params
        if hasattr(params, "std_init"):
            params = params.replace(std_init=jnp.asarray(self.std_init, jnp.float32))
        return params

    def init(self, learner: InnerLearner, sampler: TaskSampler, key: Array,
             meta: MetaParams | None = None) -> OuterState:
        """The strategy's state, its mean at the learner's initial meta-parameters (or `meta`)."""
        k_init, rest = jax.random.split(key)  # same init key as the gradient loop
        k_es, k_run = jax.random.split(rest)
        meta0 = initial_meta(learner, sampler, k_init, meta)
        self.check_fitness(learner, meta0, sampler)
        es = self.es(meta0)
        es_state = es.init(k_es, meta0, self.es_params(es))
        es_state = jax.tree.map(jnp.asarray, es_state)
        return OuterState(jnp.asarray(0, jnp.int32), k_run, meta0, es_state)

    def check_fitness(self, learner: InnerLearner, meta: MetaParams,
                      sampler: TaskSampler) -> None:
        """Refuse a fitness metric that the learner does not report."""
        metrics = jax.eval_shape(lambda m: learner.loss(m, sampler.example(),
                                                        jax.random.PRNGKey(0))[1], meta)
        name = self.fitness.lstrip("-")
        have = sorted(metrics) + (["error"] if "accuracy" in metrics else [])
        if name not in have:
            raise ValueError(f"fitness={self.fitness!r}, but {type(learner).__name__} reports "
                             f"{', '.join(have)}: choose one of those "
                             f"({setting('fitness', 'outer.evolution.fitness', 'loss')})")

    def fitness_of(self, metrics: dict) -> Array:
        """The minimised fitness [P] from the members' metrics (NaN: inf)."""
        name = self.fitness.lstrip("-")
        f = 1.0 - metrics["accuracy"] if name == "error" else metrics[name]
        f = -f if self.fitness.startswith("-") else f
        return jnp.where(jnp.isnan(f), jnp.inf, f)

    def member_losses(self, learner: InnerLearner, members: PyTree, episodes,
                      key: Array) -> tuple[Array, dict]:
        """Mean query loss [P] and metrics of every member (leading axis), same episodes."""
        return jax.vmap(lambda m: batch_loss(learner, m, episodes, key))(members)

    def population_fitness(self, learner: InnerLearner, population: PyTree, episodes,
                           key: Array) -> Array:
        """Fitness of every member (leading axis) on the same episodes (NaN: inf)."""
        return self.fitness_of(self.member_losses(learner, population, episodes, key)[1])

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
        episodes = sampler.sample_batch(k_sample, self.batch_size)
        # The deployed meta-parameters (the mean) are scored on the same episodes, as extra
        # members of the one vmapped evaluation (one per device, keeping the split even): the
        # `loss` and metrics the gradient loop logs for its parameters, so both loops' curves
        # compare. (Scoring the mean in a second, separate vmap hangs XLA:CPU in jax 0.10.2 when
        # the learner calls LAPACK, e.g. jnp.linalg.solve, inside the compiled scan.)
        extra = mesh.size if mesh is not None else 1
        mean = es.get_mean(state.opt_state)
        members = jax.tree.map(
            lambda p, m: jnp.concatenate([p, jnp.broadcast_to(m, (extra, *m.shape))]),
            population, mean)
        losses, member_metrics = self.member_losses(learner, shard_leading(members, mesh),
                                                    episodes, k_loss)
        fit = self.fitness_of(jax.tree.map(lambda v: v[:-extra], member_metrics))
        deployed = jax.tree.map(lambda v: v[-1], member_metrics)
        es_state, _ = es.tell(k_tell, population, fit, es_state, params)
        mean_ok = jnp.all(jnp.isfinite(es_state.mean))
        finite = jnp.isfinite(fit)
        metrics = {
            **deployed,
            "loss": jnp.where(mean_ok, deployed["loss"], jnp.nan),
            "best_member_loss": jnp.min(jnp.where(jnp.isnan(losses[:-extra]), jnp.inf,
                                                  losses[:-extra])),
            "fitness_mean": jnp.sum(jnp.where(finite, fit, 0.0)) / jnp.maximum(finite.sum(), 1),
            "fitness_best_so_far": es_state.best_fitness,
            "std": jnp.mean(jnp.asarray(es_state.std)),
        }
        return OuterState(state.step + 1, state.key, state.params, es_state), metrics

    def meta_params(self, state: OuterState) -> MetaParams:
        """The strategy's mean, as a meta-parameter pytree."""
        return self.es(state.params).get_mean(state.opt_state)

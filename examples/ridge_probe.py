"""Ridge probe on 2-D blobs: a learner, a sampler and an experiment written outside metalearn.

    metalearn train examples/ridge_probe.py                            # gradient meta-training
    metalearn train examples/ridge_probe.py --set outer.kind=evolution  # CMA-ES instead

The learner meta-learns a feature map phi(x) = tanh(x W + b) and, per task, fits a ridge
regression from the support features to one-hot labels in closed form,
B = (Phi^T Phi + lambda I)^-1 Phi^T Y, then scores queries with logits s * phi(x) B.
W, b, log lambda and log s are the meta-parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metalearn import Episode, InnerLearner, TaskSampler
from metalearn.experiment import Experiment, base_config, outer_config


@dataclasses.dataclass(frozen=True)
class Blobs(TaskSampler):
    """N-way classification of 2-D Gaussian blobs around random centres."""

    ways: int = 3
    shots: int = 5
    queries: int = 10
    spread: float = 0.7  # standard deviation of a blob around its centre

    def sample(self, key: jax.Array) -> Episode:
        """One episode: new centres, `shots` support and `queries` query points per class."""
        k_centre, k_support, k_query = jax.random.split(key, 3)
        centres = 2.0 * jax.random.normal(k_centre, (self.ways, 2))

        def points(k: jax.Array, per_class: int) -> tuple[jax.Array, jax.Array]:
            y = jnp.repeat(jnp.arange(self.ways), per_class)
            return centres[y] + self.spread * jax.random.normal(k, (y.size, 2)), y

        return Episode(*points(k_support, self.shots), *points(k_query, self.queries))


@dataclasses.dataclass(frozen=True)
class RidgeProbe(InnerLearner):
    """Meta-learned features, a closed-form ridge-regression readout fitted per task."""

    ways: int = 3
    features: int = 32

    def init(self, key: jax.Array, example: Episode) -> dict:
        """W ~ N(0, 1), b = 0, lambda = 1, s = 1."""
        d = example.support_x.shape[-1]
        return {"w": jax.random.normal(key, (d, self.features)), "b": jnp.zeros(self.features),
                "log_lambda": jnp.zeros(()), "log_scale": jnp.zeros(())}

    def features_of(self, meta: dict, x: jax.Array) -> jax.Array:
        """phi(x) = tanh(x W + b)."""
        return jnp.tanh(x @ meta["w"] + meta["b"])

    def adapt(self, meta: dict, support, key: jax.Array) -> jax.Array:
        """The ridge solution B [features, ways] on the support set."""
        phi = self.features_of(meta, support.x)
        gram = phi.T @ phi + jnp.exp(meta["log_lambda"]) * jnp.eye(self.features)
        return jnp.linalg.solve(gram, phi.T @ jax.nn.one_hot(support.y, self.ways))

    def predict(self, meta: dict, state: jax.Array, query_x: jax.Array) -> jax.Array:
        """Logits [Q, ways] = s * phi(x) B."""
        return jnp.exp(meta["log_scale"]) * self.features_of(meta, query_x) @ state


def get_config():
    """Every field can be changed with --set KEY=VALUE."""
    return base_config(
        steps=300, eval_every=100, eval_episodes=500, test_episodes=1000,
        task={"ways": 3, "shots": 5, "queries": 10, "spread": 0.7},
        learner={"features": 32},
        outer=outer_config("gradient", gradient={"learning_rate": 0.01},
                           evolution={"strategy": "CMA_ES", "population_size": 16},
                           batch_size=16))


DOCS = {  # shown by `metalearn config examples/ridge_probe.py`
    "task.ways": "classes per episode", "task.shots": "support points per class",
    "task.queries": "query points per class", "task.spread": "standard deviation of a blob",
    "learner.features": "width of the meta-learned feature map",
}


def build(config, run) -> Experiment:
    """The learner and the samplers of each split."""
    t = config.task
    task = Blobs(t.ways, t.shots, t.queries, t.spread)
    return Experiment(RidgeProbe(t.ways, config.learner.features),
                      {"train": task, "test": task})

"""In-context regression tasks generated in JAX on the fly.

Linear regression as in von Oswald et al. (2023): x ~ U(-a, a)^d (or N(0, I)), w ~ N(0, s^2 I),
y = w.x (+ noise). Targets are always [n, dy] float arrays.
"""

from __future__ import annotations

import dataclasses

import jax

from metalearn.core import Array, Episode, TaskSampler


def _inputs(key: Array, shape: tuple[int, ...], dist: str, scale: float) -> Array:
    if dist == "uniform":
        return jax.random.uniform(key, shape, minval=-scale, maxval=scale)
    if dist == "normal":
        return scale * jax.random.normal(key, shape)
    raise ValueError(f"unknown input distribution {dist!r}; use 'uniform' or 'normal'")


@dataclasses.dataclass(frozen=True)
class LinearRegression(TaskSampler):
    """y = W x (+ noise) with W ~ N(weight_mean, weight_scale^2) per task.

    `input_range` is the half-width a of U(-a, a) (or the std for `input_dist='normal'`).
    The released code of von Oswald et al. uses U(-0.5, 0.5), i.e. input_range=0.5.
    """

    dim: int = 10
    num_context: int = 10
    num_queries: int = 1
    dim_out: int = 1
    input_dist: str = "uniform"
    input_range: float = 0.5
    weight_scale: float = 1.0
    weight_mean: float = 0.0
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        for f in ("dim", "num_context", "num_queries", "dim_out"):
            if getattr(self, f) < 1:
                raise ValueError(f"LinearRegression.{f} must be >= 1, got {getattr(self, f)}")
        if self.input_dist not in ("uniform", "normal"):
            raise ValueError(f"unknown input_dist {self.input_dist!r}; use 'uniform' or 'normal'")

    def sample(self, key: Array) -> Episode:
        """One task: N context pairs and Q query pairs sharing the teacher W."""
        kw, kx, kn = jax.random.split(key, 3)
        n = self.num_context + self.num_queries
        w = self.weight_mean + self.weight_scale * jax.random.normal(kw, (self.dim, self.dim_out))
        x = _inputs(kx, (n, self.dim), self.input_dist, self.input_range)
        y = x @ w + self.noise_std * jax.random.normal(kn, (n, self.dim_out))
        c = self.num_context
        return Episode(x[:c], y[:c], x[c:], y[c:])

    def describe(self) -> dict:
        """Config of the task distribution."""
        return {"sampler": type(self).__name__, **dataclasses.asdict(self)}

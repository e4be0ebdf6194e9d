"""In-context regression tasks generated in JAX on the fly.

Every task family draws task parameters theta from a prior, inputs x, and targets
y = f_theta(x) (+ noise); targets are always [n, dy] float arrays.

- `LinearRegression`: von Oswald et al. (2023), x ~ U(-a, a)^d (or N(0, a^2 I)),
  W ~ N(m, s^2 I), y = W x.
- `SparseLinearRegression`: the same with only `nonzero` of the d input weights non-zero.
- `TeacherNetwork`: a random 2-layer tanh/ReLU network y = W2 act(W1 x + b1) + b2.
- `Sinusoid`: MAML's sine waves y = A sin(x - phi), A ~ U(0.1, 5), phi ~ U(0, pi), x ~ U(-5, 5).

Out-of-distribution variants: `task.ood(input_scale=..., weight_scale=...)` widens the inputs or
the prior; `TaskPool(task, num_tasks, seed)` draws tasks from a finite pool instead of the prior.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import Array, Episode, TaskSampler


def _flat(draw: Any, key: Array, shape: tuple[int, ...], **kw: Any) -> Array:
    """`draw(key, shape)` as one flat draw reshaped: the same numbers, but under `vmap` on CPU
    multi-dimensional `jax.random` draws are slower (2048 linear-regression tasks, d = N = 10:
    4.0-4.9 ms with 2-D draws, 2.2-2.5 ms with flat ones)."""
    return draw(key, (math.prod(shape),), **kw).reshape(shape)


def _inputs(key: Array, shape: tuple[int, ...], dist: str, scale: float) -> Array:
    if dist == "uniform":
        return _flat(jax.random.uniform, key, shape, minval=-scale, maxval=scale)
    if dist == "normal":
        return scale * _flat(jax.random.normal, key, shape)
    raise ValueError(f"unknown input distribution {dist!r}; use 'uniform' or 'normal'")


class RegressionTask(TaskSampler):
    """Base of the function families: `task_params(key)` draws theta, `apply(theta, x)` is f.

    Subclasses are frozen dataclasses with the fields num_context, num_queries, input_dist,
    input_range and noise_std (plus their own); `_weight_fields` are scaled by `ood`.
    """

    num_context: int
    num_queries: int
    input_dist: str
    input_range: float
    noise_std: float
    _weight_fields: ClassVar[tuple[str, ...]] = ()

    @property
    def input_dim(self) -> int:
        """Width of x."""
        return int(getattr(self, "dim", 1))

    @property
    def output_dim(self) -> int:
        """Width of y."""
        return int(getattr(self, "dim_out", 1))

    def __post_init__(self) -> None:
        for f in ("num_context", "num_queries"):
            if getattr(self, f) < 1:
                raise ValueError(f"{type(self).__name__}.{f} must be >= 1, got {getattr(self, f)}")
        if self.input_dim < 1 or self.output_dim < 1:
            raise ValueError(f"{type(self).__name__}: input and output widths must be >= 1, got "
                             f"{self.input_dim} and {self.output_dim}")
        if self.input_dist not in ("uniform", "normal"):
            raise ValueError(f"unknown input_dist {self.input_dist!r}; use 'uniform' or 'normal'")
        if self.noise_std < 0 or self.input_range < 0:
            raise ValueError(f"{type(self).__name__}: noise_std and input_range must be >= 0")

    def task_params(self, key: Array) -> Any:
        """theta for one task, drawn from the prior."""
        raise NotImplementedError

    def apply(self, theta: Any, x: Array) -> Array:
        """f_theta(x): [n, input_dim] -> [n, output_dim]."""
        raise NotImplementedError

    def episode(self, theta: Any, key_x: Array, key_noise: Array) -> Episode:
        """Context and query pairs of the task theta (fresh inputs and noise)."""
        n = self.num_context + self.num_queries
        x = _inputs(key_x, (n, self.input_dim), self.input_dist, self.input_range)
        y = self.apply(theta, x)
        y = y + self.noise_std * _flat(jax.random.normal, key_noise, y.shape)
        c = self.num_context
        return Episode(x[:c], y[:c], x[c:], y[c:])

    def sample(self, key: Array) -> Episode:
        """One task: N context pairs and Q query pairs sharing theta."""
        kw, kx, kn = jax.random.split(key, 3)
        return self.episode(self.task_params(kw), kx, kn)

    def ood(self, input_scale: float = 1.0, weight_scale: float = 1.0,
            **changes: Any) -> RegressionTask:
        """An out-of-distribution variant: inputs and/or the prior's weight scale multiplied."""
        upd = {"input_range": self.input_range * input_scale, **changes}
        for f in self._weight_fields:
            upd[f] = getattr(self, f) * weight_scale
        return dataclasses.replace(self, **upd)

    def describe(self) -> dict:
        """Config of the task distribution."""
        return {"sampler": type(self).__name__, **dataclasses.asdict(self)}  # type: ignore


@dataclasses.dataclass(frozen=True)
class LinearRegression(RegressionTask):
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
    _weight_fields: ClassVar[tuple[str, ...]] = ("weight_scale",)

    def task_params(self, key: Array) -> Array:
        """W [dim, dim_out]."""
        return self.weight_mean + self.weight_scale * _flat(
            jax.random.normal, key, (self.dim, self.dim_out))

    def apply(self, theta: Array, x: Array) -> Array:
        """x W."""
        return x @ theta

    def sample(self, key: Array) -> Episode:
        """One task: N context and Q query pairs sharing W, with W and x from one flat uniform
        vector (normals as sqrt(2) erfinv(u), u ~ U(-1, 1), as `jax.random.normal` makes them).
        The law of `episode(task_params(k), ...)`, faster under `vmap` on CPU: 1.7-1.9 ms per
        2048 tasks (d = N = 10) against 2.2-2.5 ms for separate flat draws, where a whole
        `icl_gd` meta-step at that batch takes about 2.5 ms."""
        ku, kn = jax.random.split(key)
        n, d, dy = self.num_context + self.num_queries, self.dim, self.dim_out
        lo = float(np.nextafter(np.float32(-1), np.float32(0)))
        u = jax.random.uniform(ku, (d * dy + n * d,), minval=lo, maxval=1.0)
        w = self.weight_mean + self.weight_scale * _normal_from_uniform(u[:d * dy])
        x = u[d * dy:] if self.input_dist == "uniform" else _normal_from_uniform(u[d * dy:])
        x = (self.input_range * x).reshape(n, d)
        y = x @ w.reshape(d, dy)
        if self.noise_std:
            y = y + self.noise_std * _flat(jax.random.normal, kn, (n, dy))
        c = self.num_context
        return Episode(x[:c], y[:c], x[c:], y[c:])


def _normal_from_uniform(u: Array) -> Array:
    """N(0, 1) draws from U(-1, 1) ones (the inverse normal CDF)."""
    return np.sqrt(2.0) * jax.lax.erf_inv(u)


@dataclasses.dataclass(frozen=True)
class SparseLinearRegression(LinearRegression):
    """Linear regression whose weights are non-zero on only `nonzero` random input coordinates."""

    nonzero: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.nonzero <= self.dim:
            raise ValueError(f"SparseLinearRegression.nonzero must lie in [1, dim={self.dim}], "
                             f"got {self.nonzero}")

    def task_params(self, key: Array) -> Array:
        """W [dim, dim_out] with dim - nonzero zero rows."""
        kw, ks = jax.random.split(key)
        w = super().task_params(kw)
        _, support = jax.lax.top_k(jax.random.uniform(ks, (self.dim,)), self.nonzero)
        mask = jnp.zeros((self.dim,), w.dtype).at[support].set(1.0)
        return w * mask[:, None]

    def sample(self, key: Array) -> Episode:
        """One task (the generic draw: the weights carry the sparsity mask)."""
        return RegressionTask.sample(self, key)


@dataclasses.dataclass(frozen=True)
class TeacherNetwork(RegressionTask):
    """y = W2 act(W1 x + b1) + b2, a random 2-layer network per task (LeCun-normal weights
    times `weight_scale`, biases N(0, bias_scale^2)); act is 'tanh' or 'relu'."""

    dim: int = 5
    hidden: int = 32
    num_context: int = 10
    num_queries: int = 1
    dim_out: int = 1
    activation: str = "tanh"
    input_dist: str = "uniform"
    input_range: float = 1.0
    weight_scale: float = 1.0
    bias_scale: float = 0.0
    noise_std: float = 0.0
    _weight_fields: ClassVar[tuple[str, ...]] = ("weight_scale", "bias_scale")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"TeacherNetwork.activation must be 'tanh' or 'relu', got "
                             f"{self.activation!r}")
        if self.hidden < 1:
            raise ValueError(f"TeacherNetwork.hidden must be >= 1, got {self.hidden}")

    def task_params(self, key: Array) -> dict:
        """{'w1', 'b1', 'w2', 'b2'}."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        s = self.weight_scale
        normal = functools.partial(_flat, jax.random.normal)
        return {"w1": s * normal(k1, (self.dim, self.hidden)) / math.sqrt(self.dim),
                "b1": self.bias_scale * jax.random.normal(k2, (self.hidden,)),
                "w2": s * normal(k3, (self.hidden, self.dim_out)) / math.sqrt(self.hidden),
                "b2": self.bias_scale * jax.random.normal(k4, (self.dim_out,))}

    def apply(self, theta: dict, x: Array) -> Array:
        """The teacher's output [n, dim_out]."""
        act = jnp.tanh if self.activation == "tanh" else jax.nn.relu
        return act(x @ theta["w1"] + theta["b1"]) @ theta["w2"] + theta["b2"]


@dataclasses.dataclass(frozen=True)
class Sinusoid(RegressionTask):
    """y = A sin(x - phase): A ~ U(amplitude_min, amplitude_max), phase ~ U(phase_min,
    phase_max), x ~ U(-input_range, input_range); MAML's defaults (0.1-5, 0-pi, 5)."""

    num_context: int = 10
    num_queries: int = 10
    input_dist: str = "uniform"
    input_range: float = 5.0
    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = math.pi
    noise_std: float = 0.0
    _weight_fields: ClassVar[tuple[str, ...]] = ("amplitude_min", "amplitude_max")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.amplitude_min > self.amplitude_max or self.phase_min > self.phase_max:
            raise ValueError("Sinusoid: need amplitude_min <= amplitude_max and "
                             "phase_min <= phase_max")

    def task_params(self, key: Array) -> tuple[Array, Array]:
        """(amplitude, phase)."""
        ka, kp = jax.random.split(key)
        a = jax.random.uniform(ka, (), minval=self.amplitude_min, maxval=self.amplitude_max)
        p = jax.random.uniform(kp, (), minval=self.phase_min, maxval=self.phase_max)
        return a, p

    def apply(self, theta: tuple[Array, Array], x: Array) -> Array:
        """A sin(x - phase), [n, 1]."""
        a, p = theta
        return a * jnp.sin(x - p)


@dataclasses.dataclass(frozen=True)
class TaskPool(TaskSampler):
    """Tasks drawn uniformly from a finite pool of `num_tasks` tasks of `task` (fixed by `seed`),
    with fresh inputs and noise each episode - versus fresh tasks from the prior."""

    task: RegressionTask
    num_tasks: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_tasks < 1:
            raise ValueError(f"TaskPool.num_tasks must be >= 1, got {self.num_tasks}")
        if not isinstance(self.task, RegressionTask):
            raise TypeError(f"TaskPool needs a RegressionTask (task_params/apply), got "
                            f"{type(self.task).__name__}")

    def task_params(self, index: Array) -> Any:
        """theta of pool member `index`."""
        return self.task.task_params(jax.random.fold_in(jax.random.PRNGKey(self.seed), index))

    def sample(self, key: Array) -> Episode:
        """A pool member chosen uniformly, with fresh inputs and noise."""
        ki, kx, kn = jax.random.split(key, 3)
        index = jax.random.randint(ki, (), 0, self.num_tasks)
        return self.task.episode(self.task_params(index), kx, kn)

    def describe(self) -> dict:
        """Config: the task family plus the pool size and seed."""
        return {"sampler": "TaskPool", "num_tasks": self.num_tasks, "seed": self.seed,
                "task": self.task.describe()}

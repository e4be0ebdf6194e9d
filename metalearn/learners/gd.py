"""Explicit in-context baselines for linear regression: GD, GD++ and least squares.

They are `InnerLearner`s, so the same evaluation code scores them and the LSA learners of
`metalearn.learners.lsa`. All start from W_0 = 0 and work on L(W) = 1/(2N) sum_i ||W x_i - y_i||^2
over the N context pairs; `fit_step_sizes` picks GD's learning rate (and GD++'s gamma) by a
deterministic zooming grid search on training tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import (
    Array,
    Episode,
    InnerLearner,
    MetaParams,
    Support,
    TaskSampler,
    batch_loss,
    query_loss,
)
from metalearn.evaluation import batch_sampler


def _xy(support: Support) -> tuple[Array, Array]:
    x = support.x.reshape(support.x.shape[0], -1)
    return x, support.y.reshape(support.y.shape[0], -1)


class LinearInContext(InnerLearner):
    """A learner whose task state is a linear model W [d, dy] fitted to the context."""

    def predict(self, meta: MetaParams, state: Array, query_x: Array) -> Array:
        """x_q W, [Q, dy]."""
        return query_x.reshape(query_x.shape[0], -1) @ state

    def loss(self, meta: MetaParams, episode: Episode, key: Array) -> tuple[Array, dict]:
        """1/2 squared error of the queries (predictions shaped like the targets)."""
        state = self.adapt(meta, episode.support(), key)
        preds = self.predict(meta, state, episode.query_x)
        return query_loss(preds.reshape(episode.query_y.shape), episode.query_y)


@dataclasses.dataclass(frozen=True)
class GradientDescent(LinearInContext):
    """`steps` steps of GD, or of GD++ with `plus_plus`, from W_0 = 0; meta = {lr, gamma}.

    Each step is the token update of the paper's construction: residuals
    r_i <- r_i - (eta/N) x_i^T sum_j x_j r_j and, for GD++, inputs x <- (I - gamma X^T X / N) x
    (the query included; gamma is ignored without `plus_plus`). Since the query never feeds back
    into the context, the prediction is linear in x_q; `adapt` returns that linear map W [d, dy]
    (for GD it is the GD iterate W_K).
    """

    steps: int = 1
    lr: float = 1.0
    gamma: float = 0.0
    plus_plus: bool = False

    def init(self, key: Array, example: Episode) -> MetaParams:
        """The step sizes as (trainable) scalars."""
        return {"lr": jnp.asarray(self.lr, jnp.float32),
                "gamma": jnp.asarray(self.gamma, jnp.float32)}

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> Array:
        """The implicit linear model W [d, dy] after `steps` (GD or GD++) steps."""
        x, r = _xy(support)
        n, d = x.shape
        eta, gamma = meta["lr"] / n, meta["gamma"] / n

        def step(carry, _):
            x, r, t, w = carry
            xtr = x.T @ r
            w = w + eta * (t @ xtr)
            r = r - eta * (x @ xtr)
            if not self.plus_plus:
                return (x, r, t, w), None
            shrink = jnp.eye(d) - gamma * (x.T @ x)
            return (x @ shrink, r, t @ shrink, w), None

        init = (x, r, jnp.eye(d, dtype=x.dtype), jnp.zeros((d, r.shape[1]), x.dtype))
        (_, _, _, w), _ = jax.lax.scan(step, init, None, length=self.steps)
        return w


@dataclasses.dataclass(frozen=True)
class LeastSquares(LinearInContext):
    """The (ridge-regularised, minimum-norm when ridge = 0) least-squares fit of the context."""

    ridge: float = 0.0

    def init(self, key: Array, example: Episode) -> MetaParams:
        """No meta-parameters."""
        return {}

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> Array:
        """W = argmin ||X W - Y||^2 + ridge ||W||^2."""
        x, y = _xy(support)
        if self.ridge > 0:
            return jnp.linalg.solve(x.T @ x + self.ridge * jnp.eye(x.shape[1]), x.T @ y)
        return jnp.linalg.pinv(x) @ y


def zoom_search(f: Callable[[np.ndarray], np.ndarray], lo: Sequence[float],
                hi: Sequence[float], grid: int = 25, rounds: int = 6) -> tuple[np.ndarray, float]:
    """Minimise a function of a few variables by grid search, zooming on the best cell.

    `f` maps candidates [M, n] to their losses [M]. Deterministic. While the best candidate of
    the first grid lies on an upper edge, that edge is moved twice as far out (at most 8 times).
    Each later round searches the box of the best point's neighbouring cells. Returns (x, f(x)).
    """
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)

    def search(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        axes = [np.linspace(a, b, grid) for a, b in zip(lo, hi, strict=True)]
        cands = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], -1)
        ls = np.asarray(f(cands))
        idx = np.unravel_index(int(np.nanargmin(ls)), (grid,) * len(lo))
        return cands[int(np.nanargmin(ls))], np.asarray(idx), ls

    x, idx, ls = search(lo, hi)
    for _ in range(8):
        edge = idx == grid - 1
        if not edge.any():
            break
        hi = np.where(edge, lo + 2 * (hi - lo), hi)
        x, idx, ls = search(lo, hi)
    best_x, best_l = x, float(np.nanmin(ls))
    for _ in range(rounds - 1):
        cell = (hi - lo) / (grid - 1)
        lo, hi = np.maximum(lo, best_x - cell), best_x + cell
        x, idx, ls = search(lo, hi)
        if float(np.nanmin(ls)) <= best_l:
            best_x, best_l = x, float(np.nanmin(ls))
    return best_x, best_l


def fit_step_sizes(learner: GradientDescent, sampler: TaskSampler, key: Array,
                   num_tasks: int = 10_000) -> tuple[MetaParams, float]:
    """Line-search GD's learning rate (GD++: lr and gamma jointly) on `num_tasks` training tasks.

    Deterministic: the tasks are drawn once from `sampler` with `key`, and a zooming grid
    search (`zoom_search`) minimises their mean query loss, starting from lr in [0, 2/m]
    (GD++: [0, 3/m] x gamma in [0, 1/m]), m = mean E[x_k^2] of the context inputs. GD++'s
    2-D search runs on the first 2000 tasks, then is refined on all of them within +-10%.
    """
    episodes = batch_sampler(sampler, num_tasks)(key)
    m = float(jnp.mean(episodes.support_x.reshape(num_tasks, -1) ** 2))
    k0 = jax.random.PRNGKey(0)

    @jax.jit
    def losses(cands: Array, eps: Episode) -> Array:
        def one(lg: Array) -> Array:
            return batch_loss(learner, {"lr": lg[0], "gamma": lg[1]}, eps, k0)[0]

        return jax.lax.map(one, cands)

    def f(eps: Episode) -> Callable[[np.ndarray], np.ndarray]:
        def fn(c: np.ndarray) -> np.ndarray:
            c = np.concatenate([c, np.zeros((len(c), 2 - c.shape[1]))], -1)
            return np.asarray(losses(jnp.asarray(c, jnp.float32), eps))

        return fn

    if learner.plus_plus:
        sub = jax.tree.map(lambda a: a[:2000], episodes)
        x, _ = zoom_search(f(sub), [0.0, 0.0], [3.0 / m, 1.0 / m], grid=9, rounds=3)
        x, _ = zoom_search(f(episodes), 0.9 * x, 1.1 * x, grid=7, rounds=3)
    else:
        x, _ = zoom_search(f(episodes), [0.0], [2.0 / m], grid=25, rounds=6)
    x = np.concatenate([x, [0.0]])[:2]
    loss = float(f(episodes)(x[None])[0])
    return {"lr": jnp.asarray(x[0], jnp.float32), "gamma": jnp.asarray(x[1], jnp.float32)}, loss

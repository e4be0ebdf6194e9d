"""Inner SGD on a linear model: meta-learned initialisation and learning rate (MAML / Meta-SGD).

The meta-parameters are the initial weights W_0, b_0 and log learning rate; `adapt` runs
`steps` full-batch gradient steps on the support loss, W_{t+1} = W_t - lr * dL_support/dW.
With `learn_lr=False` the learning rate is fixed (MAML); with `per_param_lr=True` it is a
per-parameter vector (Meta-SGD).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metalearn.core import Array, Episode, InnerLearner, MetaParams, Support, query_loss


def _linear(w: dict, x: Array) -> Array:
    return x.reshape(x.shape[0], -1) @ w["w"] + w["b"]


@dataclasses.dataclass(frozen=True)
class InnerSGD(InnerLearner):
    """A linear model adapted by `steps` SGD steps from a meta-learned start."""

    steps: int = 3
    init_lr: float = 0.1
    learn_lr: bool = True
    per_param_lr: bool = False

    def init(self, key: Array, example: Episode) -> MetaParams:
        """W_0 = 0, b_0 = 0 and the log learning rate."""
        d = int(jnp.size(example.support_x[0]))
        if example.is_classification:
            raise ValueError("InnerSGD is a regression learner: support_y must be float targets "
                             "[S, dy]; for classification use a few-shot image learner")
        dy = example.support_y.shape[-1] if example.support_y.ndim > 1 else 1
        w0 = {"w": jnp.zeros((d, dy)), "b": jnp.zeros((dy,))}
        log_lr = jnp.log(self.init_lr)
        if self.per_param_lr:
            log_lr = jax.tree.map(lambda p: jnp.full(p.shape, log_lr), w0)
        return {"w0": w0, "log_lr": log_lr}

    def _support_loss(self, w: dict, support: Support) -> Array:
        y = support.y.reshape(support.y.shape[0], -1)
        return query_loss(_linear(w, support.x), y)[0]

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> dict:
        """`steps` gradient steps on the support loss."""
        lr = jnp.exp(meta["log_lr"])
        if not self.learn_lr:
            lr = jax.lax.stop_gradient(lr)

        def step(w, _):
            g = jax.grad(self._support_loss)(w, support)
            if self.per_param_lr:
                return jax.tree.map(lambda p, gi, a: p - a * gi, w, g, lr), None
            return jax.tree.map(lambda p, gi: p - lr * gi, w, g), None

        w, _ = jax.lax.scan(step, meta["w0"], None, length=self.steps)
        return w

    def predict(self, meta: MetaParams, state: dict, query_x: Array) -> Array:
        """Linear predictions [Q, dy] of the adapted model."""
        return _linear(state, query_x)

"""MAML (Finn et al. 2017) on any model, with first-order MAML, Meta-SGD and ANIL as options.

The meta-parameters are the model's initial weights theta (and, when learned, the inner step
size alpha). `adapt` runs T gradient steps on the support loss L_S, inside `lax.scan`:

    theta_0 = theta,    theta_{t+1} = theta_t - alpha * grad L_S(theta_t),

and `predict` applies theta_T to the queries. The outer loop differentiates the query loss
L_Q(theta_T) through the whole inner loop (second order). Options:

- `first_order`: first-order MAML, the inner gradients are constants (stop-gradient), so
  d L_Q / d theta = grad L_Q(theta_T) and no second derivatives are taken.
- `lr_mode`: "fixed" (alpha = `inner_lr`, not meta-learned), "scalar" (one learned alpha) or
  "per_param" (Meta-SGD, Li et al. 2017: an alpha of the shape of every weight, applied
  elementwise). Learned step sizes are stored as log alpha, so they stay positive (Meta-SGD
  itself learns alpha directly and allows negative entries).
- `anil`: adapt only the model's head (Raghu et al. 2020); the body is meta-learned only.
- `eval_inner_steps`: T at evaluation (`for_evaluation()`), e.g. more steps than in training.

Models follow the contract of `metalearn.nn.Model`. For batch-norm models (the few-shot CNN)
every forward pass of the inner loop normalises with the support set's own statistics, and the
queries are normalised with the statistics of the support set under the adapted weights theta_T,
as ProtoNet does: a query's prediction depends on the support set and on that query only (the
original MAML code normalises the query batch with its own statistics, which makes the
predictions depend on the other queries).

Classification uses logits over `model.out_dim` classes; columns of labels that have no support
example are masked out (`MASKED_LOGIT`), in the inner loss and in the predictions, so a model
trained 20-way is evaluated 5-way on its first five output units.

`MAMLNetwork` is the same method on the network that the learned update rules train (the
Hebbian genome's and the learned optimizers' `Network`: fully connected, squared error to the
target codes, scored by `meta_loss`): theta is that network's initial weights, meta-learned
instead of drawn per episode, and the T inner steps are SGD at alpha (fixed, one learned scalar,
or Meta-SGD's per-weight rates). It is the learned-initialisation entry of the learned-rule
head-to-head: the rules learn how to step from a random start, MAML where to start.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from metalearn.core import Array, Episode, InnerLearner, MetaParams, PyTree, Support, query_loss
from metalearn.learners.network import Network
from metalearn.learners.protonet import MASKED_LOGIT
from metalearn.nn import Model

LR_MODES = ("fixed", "scalar", "per_param")


def _check_options(name: str, lr_mode: str, inner_lr: float) -> None:
    if lr_mode not in LR_MODES:
        raise ValueError(f"{name}.lr_mode={lr_mode!r}; choose one of {LR_MODES}")
    if not inner_lr > 0:
        raise ValueError(f"{name}.inner_lr must be > 0, got {inner_lr}")


def _step_sizes(lr_mode: str, inner_lr: float, adapted: PyTree) -> PyTree:
    """The meta-parameters of alpha: {} (fixed), {"log_lr": scalar} or per-weight log rates."""
    log_lr = jnp.log(jnp.float32(inner_lr))
    if lr_mode == "scalar":
        return {"log_lr": log_lr}
    if lr_mode == "per_param":
        return {"log_lr": jax.tree.map(lambda p: jnp.full(p.shape, log_lr), adapted)}
    return {}


def _sgd_step(lr_mode: str, inner_lr: float, meta: MetaParams, params: PyTree, grads: PyTree
              ) -> PyTree:
    """params - alpha * grads, alpha of `lr_mode` (per weight for per_param)."""
    if lr_mode == "fixed":
        return jax.tree.map(lambda p, g: p - jnp.float32(inner_lr) * g, params, grads)
    if lr_mode == "scalar":
        return jax.tree.map(lambda p, g: p - jnp.exp(meta["log_lr"]) * g, params, grads)
    return jax.tree.map(lambda p, g, a: p - jnp.exp(a) * g, params, grads, meta["log_lr"])


@dataclasses.dataclass(frozen=True)
class MAML(InnerLearner):
    """A model adapted by `inner_steps` SGD steps on the support loss from a meta-learned start."""

    model: Model
    inner_steps: int = 5
    inner_lr: float = 0.1
    lr_mode: str = "fixed"
    first_order: bool = False
    anil: bool = False
    eval_inner_steps: int | None = None  # None: inner_steps

    def __post_init__(self) -> None:
        if not isinstance(self.model, Model):
            raise TypeError(f"MAML.model must be a metalearn.nn.Model (Linear, MLP, CNN or your "
                            f"own), got {type(self.model).__name__}")
        _check_options("MAML", self.lr_mode, self.inner_lr)
        if self.inner_steps < 0 or (self.eval_inner_steps or 0) < 0:
            raise ValueError(f"MAML.inner_steps and eval_inner_steps must be >= 0, got "
                             f"{self.inner_steps} and {self.eval_inner_steps}")

    def for_evaluation(self) -> MAML:
        """The same learner with `eval_inner_steps` inner steps (what scores evaluations)."""
        if self.eval_inner_steps is None:
            return self
        return dataclasses.replace(self, inner_steps=self.eval_inner_steps)

    # ----- meta-parameters
    def init(self, key: Array, example: Episode) -> MetaParams:
        """theta from the model's init; log alpha when the step size is learned."""
        params = self.model.init(key, example.support_x)
        out = jax.eval_shape(lambda p: self.model.apply(p, example.support_x)[0], params)
        y = example.support_y
        if example.is_classification:
            need = int(jnp.max(jnp.concatenate([y, example.query_y]))) + 1
            if out.ndim != 2 or out.shape[-1] < need:
                raise ValueError(f"the model outputs shape {out.shape[1:]} per example but the "
                                 f"episode has labels up to {need - 1}: set the model's "
                                 f"out_dim >= {need} (the number of ways)")
        elif math.prod(out.shape[1:]) != math.prod(y.shape[1:]):
            raise ValueError(f"the model outputs shape {out.shape[1:]} per example but the "
                             f"targets have shape {y.shape[1:]}: set the model's out_dim to "
                             f"{math.prod(y.shape[1:])}")
        if self.anil and "head" not in params:
            raise ValueError(f"MAML(anil=True) adapts params['head'], but "
                             f"{type(self.model).__name__} has no head (give it an out_dim)")
        return {"params": params, **_step_sizes(self.lr_mode, self.inner_lr,
                                                self._adapted(params))}

    # ----- the inner loop
    def _adapted(self, params: PyTree) -> PyTree:
        return params["head"] if self.anil else params

    def _merge(self, params: PyTree, adapted: PyTree) -> PyTree:
        return {**params, "head": adapted} if self.anil else adapted

    def _outputs(self, params: PyTree, x: Array, stats: PyTree, present: Array | None) -> Array:
        out, _ = self.model.apply(params, x, stats)
        if present is None:
            return out.reshape(out.shape[0], -1)
        return jnp.where(present[None, :], out, MASKED_LOGIT)

    def support_loss(self, params: PyTree, support: Support, present: Array | None) -> Array:
        """L_S: the loss of `params` on the support set (its own batch statistics)."""
        y = support.y if present is not None else support.y.reshape(support.y.shape[0], -1)
        return query_loss(self._outputs(params, support.x, None, present), y)[0]

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> dict:
        """theta_T after `inner_steps` SGD steps on L_S, and the support's statistics under it."""
        params = meta["params"]
        present = None
        if jnp.issubdtype(support.y.dtype, jnp.integer):
            k = jax.eval_shape(lambda p, x: self.model.apply(p, x)[0], params,
                               support.x[:1]).shape[-1]
            present = jnp.sum(jax.nn.one_hot(support.y, k), axis=0) > 0

        def step(fast: PyTree, _) -> tuple[PyTree, None]:
            g = jax.grad(lambda a: self.support_loss(self._merge(params, a), support,
                                                     present))(fast)
            if self.first_order:
                g = jax.lax.stop_gradient(g)
            return _sgd_step(self.lr_mode, self.inner_lr, meta, fast, g), None

        fast, _ = jax.lax.scan(step, self._adapted(params), None, length=self.inner_steps)
        adapted = self._merge(params, fast)
        _, stats = self.model.apply(adapted, support.x)
        return {"params": adapted, "stats": stats, "present": present}

    def predict(self, meta: MetaParams, state: dict, query_x: Array) -> Array:
        """Outputs of the adapted model: masked logits [Q, classes] or targets [Q, dy]."""
        return self._outputs(state["params"], query_x, state["stats"], state["present"])


@dataclasses.dataclass(frozen=True)
class MAMLNetwork(Network):
    """MAML / Meta-SGD on the learned rules' network: meta-learned initial weights theta (and
    step sizes alpha), then T SGD steps on the support's squared error to the target codes."""

    inner_lr: float = 0.1
    lr_mode: str = "fixed"
    first_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_options("MAMLNetwork", self.lr_mode, self.inner_lr)

    def init(self, key: Array, example: Episode) -> MetaParams:
        """theta: the network's random initial weights [n_c + 1, n_{c+1}] (bias last row), as
        the other learners of this network draw them per episode; log alpha when learned."""
        self.check_episode(example)
        weights = [s["F"][0] for s in self.synapses(key, math.prod(example.support_x.shape[1:]))]
        return {"weights": weights, **_step_sizes(self.lr_mode, self.inner_lr, weights)}

    def init_state(self, meta: MetaParams, key: Array, d_in: int) -> list[Array]:
        """theta itself: every episode (and replica) starts from the learned weights."""
        return meta["weights"]

    def outputs(self, meta: MetaParams, state: list[Array], x: Array) -> Array:
        """The MLP's outputs [B, ways]."""
        return self.mlp_outputs(state, x)

    def update(self, meta: MetaParams, state: list[Array], x: Array, y: Array, t: Array
               ) -> list[Array]:
        """theta_{t+1} = theta_t - alpha * grad of the batch's squared error."""
        g = jax.grad(self.train_loss)(state, x, y)
        if self.first_order:
            g = jax.lax.stop_gradient(g)
        return _sgd_step(self.lr_mode, self.inner_lr, meta, state, g)

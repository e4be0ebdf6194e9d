"""Meta-training over truncated unrolls: truncated backprop (TBPTT) and persistent evolution
strategies (PES, Vicol, Metz and Sohl-Dickstein 2021), for inner horizons far longer than one
unroll.

A batch of `batch_size` tasks ("particles") is in flight. Each meta-step advances every task by
K = `truncation` inner steps, from the inner state the previous meta-step left, and scores the
truncation by the learner's unroll loss L_k(theta) (the query meta-loss averaged over its K
steps); a task that has run `horizon` inner steps (default: the learner's) restarts on a new
episode. First restarts are staggered (each task starts at a random multiple of K), so tasks
do not run in lock step. The whole-task objective is the mean of the truncations' losses.

- `tbptt`: g = mean_i dL_k^i / dtheta, back-propagated through the K steps only (the inner
  state at the truncation's start is a constant): cheap and biased toward short horizons.
- `pes`: antithetic pairs theta +/- eps_i, eps_i ~ N(0, sigma^2 I), each with its own inner
  state, and a per-task accumulator xi_i <- xi_i + eps_i (reset with the task):

      g = 1 / (2 sigma^2 N) sum_i (L_k(theta + eps_i) - L_k(theta - eps_i)) xi_i,

  an unbiased estimate of the gradient of the smoothed loss of the *whole* unroll so far,
  the dependence of the truncation on earlier ones included (xi carries the earlier
  perturbations that shaped the state).

The estimate goes to an optax optimizer (`optimizer`, `learning_rate`, `clip_norm`, named as in
the gradient loop). A pair whose loss is NaN or infinite (a diverged inner run) restarts its
task and adds nothing to the estimate. With `max_loss` set, a loss above it (or NaN/inf) also
restarts its task, and PES scores it as `max_loss`: an exploding but finite loss (cross-entropy
of unbounded outputs) would otherwise swamp the sum, whose weights are loss differences, while
a pair with one side capped still says which direction diverged (dropping such pairs instead
leaves no signal once most tasks diverge, and the rule never comes back).

The learner declares truncated unrolls (`Unrollable`): the Hebbian genome and the learned
optimizers (`metalearn.learners.network.Network`'s subclasses) do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from metalearn.core import Array, Episode, MetaParams, PyTree, TaskSampler
from metalearn.outer.base import OuterLoop, OuterState, initial_meta, option, shard_leading
from metalearn.outer.gradient import OPTIMIZERS, GradientOuterLoop
from metalearn.outer.registry import register

ESTIMATORS = ("pes", "tbptt")


@runtime_checkable
class Unrollable(Protocol):
    """A learner whose inner loop runs in pieces: what `TruncatedOuterLoop` needs."""

    @property
    def horizon(self) -> int:
        """Inner steps of a whole task."""

    def unroll_init(self, meta: MetaParams, episode: Episode, key: Array) -> PyTree:
        """The inner state (carry) at inner step 0 (a constant to the estimators: it may not
        depend on the meta-parameters)."""

    def unroll(self, meta: MetaParams, carry: PyTree, episode: Episode, t0: Array,
               steps: int) -> tuple[PyTree, Array, dict]:
        """`steps` inner steps from step t0: (carry, loss, metrics) of the truncation."""


class Particles(NamedTuple):
    """The tasks in flight (leading axis: batch_size), carried from one meta-step to the next."""

    episodes: Episode
    carry: PyTree  # tbptt: the inner state; pes: (state at theta + eps, state at theta - eps)
    t: Array  # int32 [B]: inner steps the task has run
    xi: PyTree  # pes: the accumulated perturbations (like the meta-parameters); tbptt: ()


@register("truncated")
@dataclasses.dataclass
class TruncatedOuterLoop(OuterLoop):
    """PES or truncated backprop over K-step pieces of long inner unrolls (module docstring)."""

    estimator: str = option("pes", "pes (persistent evolution strategies, unbiased over the "
                                   "whole unroll) or tbptt (truncated backprop, biased)")
    truncation: int = option(10, "K: inner steps per meta-step")
    horizon: int = option(0, "inner steps of a task before it restarts on a new episode (0: the "
                             "learner's inner_steps)")
    std: float = option(0.01, "pes: sigma, the perturbations' standard deviation")
    optimizer: str = option("adam", f"optax optimizer of the estimate: {', '.join(OPTIMIZERS)}")
    learning_rate: float = option(1e-3, "learning rate of the optimizer")
    clip_norm: float | None = option(None, "clip the estimate to this global norm (None: no "
                                           "clip)")
    max_loss: float = option(0.0, "a truncation loss above this (or NaN/inf) restarts its "
                                  "task and counts as this in PES (0: NaN/inf restart, and add "
                                  "nothing)")
    batch_size: int = 8  # tasks in flight (pes: antithetic pairs)
    steps_per_call: int = 10
    shard: bool | None = None

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"outer.truncated.estimator={self.estimator!r}; choose one of "
                             f"{', '.join(ESTIMATORS)}")
        for name in ("truncation", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"outer.truncated.{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.horizon < 0:
            raise ValueError(f"outer.truncated.horizon must be >= 0 (0: the learner's "
                             f"inner_steps), got {self.horizon}")
        if self.max_loss < 0:
            raise ValueError(f"outer.truncated.max_loss must be >= 0 (0: no bound), got "
                             f"{self.max_loss}")
        if self.estimator == "pes" and not self.std > 0:
            raise ValueError(f"outer.truncated.std must be > 0 for PES, got {self.std}")
        self._tx = GradientOuterLoop(optimizer=self.optimizer, learning_rate=self.learning_rate,
                                     clip_norm=self.clip_norm).tx()

    def remedy(self) -> str:
        """A smaller learning rate or perturbation."""
        return "a smaller outer.truncated.learning_rate or outer.truncated.std"

    # ----- helpers
    def _ok(self, losses: Array) -> Array:
        """Which tasks go on: loss finite, and at most `max_loss` when it is set."""
        ok = jnp.isfinite(losses)
        return ok & (losses <= self.max_loss) if self.max_loss else ok

    def _capped(self, losses: Array) -> Array:
        """Losses above `max_loss`, NaN or infinite, as `max_loss`."""
        return jnp.where(jnp.isfinite(losses), jnp.minimum(losses, self.max_loss), self.max_loss)

    def _horizon(self, learner: Any) -> int:
        if not isinstance(learner, Unrollable):
            raise TypeError(f"{type(learner).__name__} has no truncated unrolls (horizon, "
                            "unroll_init, unroll: metalearn.outer.truncated.Unrollable); train "
                            "it with outer.kind=gradient or evolution")
        h = self.horizon or learner.horizon
        if h < self.truncation:
            raise ValueError(f"the horizon ({h} inner steps) is shorter than one truncation "
                             f"(outer.truncated.truncation={self.truncation}); lower the "
                             "truncation or raise outer.truncated.horizon")
        return h

    def _fresh(self, learner: Any, params: MetaParams, sampler: TaskSampler, key: Array
               ) -> tuple[Episode, PyTree]:
        """A new episode per task and its inner state(s) at step 0."""
        k_ep, k_in = jax.random.split(key)
        episodes = jax.vmap(sampler.sample)(jax.random.split(k_ep, self.batch_size))
        keys = jax.random.split(k_in, self.batch_size)
        init = jax.vmap(learner.unroll_init, in_axes=(None, 0, 0))
        if self.estimator == "tbptt":
            return episodes, init(params, episodes, keys)
        # both members of a pair start from the unperturbed network (no xi yet)
        carry = init(params, episodes, keys)
        return episodes, (carry, jax.tree.map(jnp.copy, carry))  # two buffers (donated apart)

    def init(self, learner: Any, sampler: TaskSampler, key: Array,
             meta: MetaParams | None = None) -> OuterState:
        """Meta-parameters, the optimizer state and the tasks in flight, staggered."""
        h = self._horizon(learner)
        k_init, k_run, k_tasks, k_stagger = jax.random.split(key, 4)
        params = initial_meta(learner, sampler, k_init, meta)
        episodes, carry = self._fresh(learner, params, sampler, k_tasks)
        pieces = -(-h // self.truncation)
        t = self.truncation * jax.random.randint(k_stagger, (self.batch_size,), 0, pieces)
        xi = (jax.tree.map(lambda p: jnp.zeros((self.batch_size, *p.shape), p.dtype), params)
              if self.estimator == "pes" else ())
        particles = Particles(episodes, carry, t.astype(jnp.int32), xi)
        return OuterState(jnp.asarray(0, jnp.int32), k_run, params,
                          (self._tx.init(params), particles))

    def step(self, learner: Any, sampler: TaskSampler, state: OuterState,
             mesh: Mesh | None = None) -> tuple[OuterState, dict]:
        """Advance every task K inner steps, estimate the gradient, update, restart tasks
        that reached the horizon (or diverged)."""
        h = self._horizon(learner)
        opt_state, p = state.opt_state
        k = jax.random.fold_in(state.key, state.step)
        k_eps, k_new = jax.random.split(k)
        grad, loss, carry, ok, xi, metrics = self.estimate(learner, state.params, p, k_eps)
        updates, opt_state = self._tx.update(grad, opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # tasks at the horizon, or diverged, restart on new episodes with fresh states
        t = p.t + self.truncation
        done = (t >= h) | ~ok
        episodes, fresh = self._fresh(learner, params, sampler, k_new)
        pick = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(done.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)
        if self.estimator == "pes":
            xi = pick(jax.tree.map(jnp.zeros_like, xi), xi)
        particles = Particles(pick(episodes, p.episodes), pick(fresh, carry),
                              jnp.where(done, 0, t).astype(jnp.int32), xi)
        particles = shard_leading(particles, mesh)
        out = {"loss": loss, "grad_norm": optax.global_norm(grad),
               "restarted": jnp.mean(done.astype(jnp.float32)),
               "diverged": jnp.mean((~ok).astype(jnp.float32))}
        if "accuracy" in metrics:
            out["accuracy"] = jnp.mean(metrics["accuracy"])
        return OuterState(state.step + 1, state.key, params, (opt_state, particles)), out

    def estimate(self, learner: Any, params: MetaParams, p: Particles, key: Array
                 ) -> tuple[PyTree, Array, PyTree, Array, PyTree, dict]:
        """The gradient estimate of one truncation (pes: with perturbations from `key`):
        (estimate, loss, the tasks' new carry, which pairs stayed finite, xi, metrics)."""
        K = self.truncation
        piece = lambda m, c, e, t: learner.unroll(m, c, e, t, K)  # noqa: E731
        if self.estimator == "tbptt":
            unroll = jax.vmap(piece, in_axes=(None, 0, 0, 0))
            def total(theta: MetaParams):
                carry, losses, metrics = unroll(theta, jax.lax.stop_gradient(p.carry),
                                                p.episodes, p.t)
                ok = self._ok(losses)
                loss = jnp.sum(jnp.where(ok, losses, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
                return loss, (carry, ok, metrics)

            (loss, (carry, ok, metrics)), grad = jax.value_and_grad(total, has_aux=True)(
                params)
            grad = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grad)
            carry = jax.lax.stop_gradient(carry)
            xi = ()
        else:
            eps = self._perturbations(params, key)
            plus = jax.tree.map(lambda m, e: m + e, params, eps)
            minus = jax.tree.map(lambda m, e: m - e, params, eps)
            one = jax.vmap(piece)
            c_plus, l_plus, m_plus = one(plus, p.carry[0], p.episodes, p.t)
            c_minus, l_minus, _ = one(minus, p.carry[1], p.episodes, p.t)
            ok = self._ok(l_plus) & self._ok(l_minus)
            xi = jax.tree.map(lambda a, e: a + e, p.xi, eps)
            if self.max_loss:  # capped: every pair counts
                l_plus, l_minus = self._capped(l_plus), self._capped(l_minus)
            counted = ok | bool(self.max_loss)
            w = jnp.where(counted, l_plus - l_minus, 0.0) / (2 * self.std ** 2 * self.batch_size)
            grad = jax.tree.map(lambda a: jnp.tensordot(w, a, axes=1), xi)
            losses = 0.5 * (l_plus + l_minus)
            loss = jnp.sum(jnp.where(counted, losses, 0.0)) / jnp.maximum(jnp.sum(counted), 1)
            carry, metrics = (c_plus, c_minus), m_plus
        return grad, loss, carry, ok, xi, metrics

    def _perturbations(self, params: MetaParams, key: Array) -> PyTree:
        """eps_i ~ N(0, sigma^2 I), one per task, shaped like the meta-parameters."""
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        eps = [self.std * jax.random.normal(k, (self.batch_size, *x.shape), x.dtype)
               for k, x in zip(keys, leaves, strict=True)]
        return jax.tree.unflatten(tree, eps)

    def meta_params(self, state: OuterState) -> MetaParams:
        """The meta-parameters being trained."""
        return state.params

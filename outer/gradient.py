"""Gradient meta-training: optax on the mean query loss over a `vmap`ped batch of episodes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from metalearn.core import Array, InnerLearner, MetaParams, TaskSampler, batch_loss
from metalearn.messages import setting
from metalearn.outer.base import OuterLoop, OuterState, initial_meta, option, shard_leading
from metalearn.outer.registry import register

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "rmsprop", "lamb", "lion")
# fields that only build the named optimizers (refused next to an optax object)
_NAMED_ONLY = ("learning_rate", "schedule", "warmup_steps", "decay_steps", "end_lr_factor",
               "decay_rate", "decay_every", "b1", "b2", "weight_decay", "momentum")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential", "linear", "step")


@register("gradient")
@dataclasses.dataclass
class GradientOuterLoop(OuterLoop):
    """optax optimizer (with schedule and clipping) on the batch-mean query loss.

    `optimizer` is a name (with `learning_rate`, `schedule` and the other fields) or any
    `optax.GradientTransformation` of your own, schedule included, e.g.
    `GradientOuterLoop(optimizer=optax.adamw(optax.cosine_decay_schedule(1e-3, 5000)))`.
    """

    optimizer: str | optax.GradientTransformation = option(
        "adam", f"optax optimizer: {', '.join(OPTIMIZERS)} (in Python also an optax "
        "GradientTransformation)")
    learning_rate: float = option(1e-3, "peak learning rate of the optimizer")
    schedule: str = option("constant", f"learning-rate schedule: {', '.join(SCHEDULES)}")
    warmup_steps: int = option(0, "linear warm-up from 0 over this many steps (0: none)")
    decay_steps: int = option(0, "horizon of cosine/linear/exponential decay (0: the run's steps)")
    end_lr_factor: float = option(0.0, "final rate / learning_rate (cosine, linear schedules)")
    decay_rate: float = option(0.5, "step: the rate is multiplied by this every decay_every "
                               "steps; exponential with decay_every: smoothly, by the same law")
    decay_every: int = option(0, "step / exponential schedules: steps per decay_rate factor "
                              "(0 with exponential: the rate halves every horizon/4 steps)")
    b1: float = option(0.9, "first-moment decay (adam, adamw, lamb, lion)")
    b2: float = option(0.999, "second-moment decay (adam, adamw, lamb, lion)")
    weight_decay: float = option(0.0, "decoupled weight decay (adamw, lamb, lion)")
    momentum: float = option(0.9, "momentum of optimizer=momentum")
    clip_norm: float | None = option(None, "clip gradients to this global norm (None: no clip)")
    batch_size: int = 32  # episodes per meta-step
    steps_per_call: int = 10
    total_steps: int = 0  # set by the experiment runner, used by schedules
    shard: bool | None = None

    @property
    def custom(self) -> bool:
        """True when `optimizer` is an optax object rather than a name."""
        return not isinstance(self.optimizer, str)

    def __post_init__(self) -> None:
        if self.custom:
            if not (callable(getattr(self.optimizer, "init", None))
                    and callable(getattr(self.optimizer, "update", None))):
                raise TypeError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or an "
                                "optax.GradientTransformation (with init and update), got "
                                f"{type(self.optimizer).__name__}")
            named = [f.name for f in dataclasses.fields(self) if f.name in _NAMED_ONLY
                     and getattr(self, f.name) != f.default]
            if named:
                raise ValueError(f"{', '.join(named)} set, but the optimizer is an optax object: "
                                 "those fields build named optimizers only; put the rate, "
                                 "schedule and decay into your optax transformation")
        elif self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if not 0 < self.decay_rate <= 1:
            raise ValueError(f"decay_rate must be in (0, 1], got {self.decay_rate}")
        if self.decay_every < 0 or (self.schedule == "step" and self.decay_every < 1):
            raise ValueError(f"schedule={self.schedule!r} needs decay_every >= 1 (steps per "
                             f"decay_rate factor), got {self.decay_every}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {self.steps_per_call}")

    def remedy(self) -> str:
        """A lower learning rate, or (tighter) gradient clipping: never what is in force."""
        clip = (f"tighter gradient clipping ({setting('clip_norm', 'outer.gradient.clip_norm')}"
                f", now {self.clip_norm:g})" if self.clip_norm else
                f"gradient clipping ({setting('clip_norm', 'outer.gradient.clip_norm', '1.0')})")
        if self.custom:
            return f"a lower learning rate in your optax optimizer or {clip}"
        return (f"a lower learning rate ({setting('learning_rate', 'outer.gradient.learning_rate')}"
                f", now {self.learning_rate:g}) or {clip}")

    def lr_schedule(self) -> optax.Schedule:
        """The learning-rate schedule."""
        lr, s = self.learning_rate, self.schedule
        horizon = max(1, (self.decay_steps or self.total_steps or 10_000) - self.warmup_steps)
        if s == "constant":
            sched = optax.constant_schedule(lr)
        elif s in ("cosine", "warmup_cosine"):
            sched = optax.cosine_decay_schedule(lr, horizon, alpha=self.end_lr_factor)
        elif s == "linear":
            sched = optax.linear_schedule(lr, lr * self.end_lr_factor, horizon)
        elif s == "step":  # Snell et al.'s halving every 2000 episodes: a staircase
            sched = optax.exponential_decay(lr, self.decay_every, self.decay_rate,
                                            staircase=True)
        elif self.decay_every:  # the HyperTransformer scripts' 0.95^(step / 1e5)
            sched = optax.exponential_decay(lr, self.decay_every, self.decay_rate)
        else:  # exponential without decay_every: lr halves every horizon/4 steps
            sched = optax.exponential_decay(lr, max(1, horizon // 4), 0.5)
        if self.warmup_steps > 0:
            warm = optax.linear_schedule(0.0, lr, self.warmup_steps)
            sched = optax.join_schedules([warm, sched], [self.warmup_steps])
        return sched

    def tx(self) -> optax.GradientTransformation:
        """The optax transformation: clipping, then the optimizer with its schedule."""
        lr = self.lr_schedule()
        o = self.optimizer
        if self.custom:
            opt = o
        elif o == "adam":
            opt = optax.adam(lr, b1=self.b1, b2=self.b2)
        elif o == "adamw":
            opt = optax.adamw(lr, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay)
        elif o == "sgd":
            opt = optax.sgd(lr)
        elif o == "momentum":
            opt = optax.sgd(lr, momentum=self.momentum)
        elif o == "rmsprop":
            opt = optax.rmsprop(lr)
        elif o == "lamb":
            opt = optax.lamb(lr, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay)
        else:
            opt = optax.lion(lr, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay)
        if self.clip_norm:
            return optax.chain(optax.clip_by_global_norm(self.clip_norm), opt)
        return opt

    def init(self, learner: InnerLearner, sampler: TaskSampler, key: Array,
             meta: MetaParams | None = None) -> OuterState:
        """Meta-parameters (the learner's init, or `meta`) and the optimizer state."""
        k_init, k_run = jax.random.split(key)
        params = initial_meta(learner, sampler, k_init, meta)
        return OuterState(jnp.asarray(0, jnp.int32), k_run, params, self.tx().init(params))

    def step(self, learner: InnerLearner, sampler: TaskSampler, state: OuterState,
             mesh: Mesh | None = None) -> tuple[OuterState, dict]:
        """Sample a batch of episodes, take one optimizer step on their mean query loss."""
        if mesh is not None and self.batch_size % mesh.size:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by the "
                             f"{mesh.size} devices it is sharded across")
        k = jax.random.fold_in(state.key, state.step)
        k_sample, k_loss = jax.random.split(k)
        keys = shard_leading(jax.random.split(k_sample, self.batch_size), mesh)
        with jax.named_scope("sampling"):  # named scopes: benchmarks/profile_step.py
            episodes = shard_leading(jax.vmap(sampler.sample)(keys), mesh)
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: batch_loss(learner, p, episodes, k_loss), has_aux=True)(state.params)
        with jax.named_scope("optimizer"):
            updates, opt_state = self.tx().update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return OuterState(state.step + 1, state.key, params, opt_state), metrics

    def meta_params(self, state: OuterState) -> MetaParams:
        """The trained meta-parameters."""
        return state.params

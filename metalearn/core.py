"""`Episode` data and two of the three seams, `TaskSampler` and `InnerLearner` (the third, the
outer loop, is `metalearn.outer`).

Every episode is a pytree of arrays, every sampler is a pure function of a PRNG key and every
learner is a set of pure functions of explicit meta-parameters, so that a whole meta-training
step can be `jit`-compiled and `vmap`ped over a batch of episodes.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any
MetaParams = PyTree
TaskState = PyTree


class Support(NamedTuple):
    """What an inner learner may see when it adapts: the labelled support set (+ unlabeled)."""

    x: Array  # [S, ...]
    y: Array  # [S] int labels or [S, dy] / [S] float targets
    unlabeled_x: Array | None = None  # [U, ...]


class Episode(NamedTuple):
    """One task: a support set to learn from and a query set to be scored on."""

    support_x: Array  # [S, ...]
    support_y: Array  # [S] int labels, or [S] / [S, dy] float targets
    query_x: Array  # [Q, ...]
    query_y: Array  # [Q] / [Q, dy]
    unlabeled_x: Array | None = None  # [U, ...] (semi-supervised learners)

    def support(self) -> Support:
        """The part of the episode an inner learner adapts on (queries excluded)."""
        return Support(self.support_x, self.support_y, self.unlabeled_x)

    @property
    def is_classification(self) -> bool:
        """True when labels are integer class ids (cross-entropy), False for regression."""
        return bool(jnp.issubdtype(jnp.asarray(self.query_y).dtype, jnp.integer))


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(np.shape(a))


def check_episode(ep: Episode, *, batched: bool = False, name: str = "episode") -> None:
    """Raise a ValueError naming the problem when `ep` is not a well-formed (batch of) episode(s).

    With `batched=True` every array carries one extra leading axis (a batch of episodes).
    Works on concrete arrays and on tracers (only static shapes/dtypes are read).
    """
    if not isinstance(ep, Episode):
        raise TypeError(f"{name} must be a metalearn.Episode, got {type(ep).__name__}")
    lead = 1 if batched else 0
    fields = {"support_x": ep.support_x, "support_y": ep.support_y,
              "query_x": ep.query_x, "query_y": ep.query_y}
    for k, v in fields.items():
        if v is None:
            raise ValueError(f"{name}.{k} is None; every episode needs support and query arrays")
        if len(_shape(v)) < 1 + lead:
            raise ValueError(f"{name}.{k} has shape {_shape(v)}; expected at least "
                             f"{1 + lead} axes ({'[B, n, ...]' if batched else '[n, ...]'})")
    sx, sy, qx, qy = (_shape(v) for v in fields.values())
    if batched:
        bs = {s[0] for s in (sx, sy, qx, qy)}
        if len(bs) != 1:
            raise ValueError(f"{name}: batch axes differ across fields "
                             f"(support_x {sx}, support_y {sy}, query_x {qx}, query_y {qy})")
        sx, sy, qx, qy = sx[1:], sy[1:], qx[1:], qy[1:]
    if sx[0] != sy[0]:
        raise ValueError(f"{name}: support_x has {sx[0]} examples but support_y has {sy[0]} "
                         f"(shapes {sx} and {sy}); they must match along the first axis")
    if qx[0] != qy[0]:
        raise ValueError(f"{name}: query_x has {qx[0]} examples but query_y has {qy[0]} "
                         f"(shapes {qx} and {qy}); they must match along the first axis")
    if sx[1:] != qx[1:]:
        raise ValueError(f"{name}: support_x examples have shape {sx[1:]} but query_x examples "
                         f"have shape {qx[1:]}; support and query inputs must share a shape")
    sdt, qdt = jnp.asarray(ep.support_y).dtype, jnp.asarray(ep.query_y).dtype
    if jnp.issubdtype(sdt, jnp.integer) != jnp.issubdtype(qdt, jnp.integer):
        raise ValueError(f"{name}: support_y is {sdt} but query_y is {qdt}; use integer labels "
                         "for classification or float targets for regression in both")
    if jnp.issubdtype(qdt, jnp.integer) and (len(sy) != 1 or len(qy) != 1):
        raise ValueError(f"{name}: integer labels must be 1-D per episode, got support_y {sy} "
                         f"and query_y {qy}")
    if ep.unlabeled_x is not None:
        ux = _shape(ep.unlabeled_x)[lead:]
        if ux[1:] != sx[1:]:
            raise ValueError(f"{name}: unlabeled_x examples have shape {ux[1:]} but support_x "
                             f"examples have shape {sx[1:]}")


class TaskSampler:
    """Makes episodes. `sample(key)` must be pure, `jit`- and `vmap`-able."""

    def sample(self, key: Array) -> Episode:
        """Draw one episode from the task distribution."""
        raise NotImplementedError

    def sample_batch(self, key: Array, batch_size: int) -> Episode:
        """Draw `batch_size` independent episodes (a `vmap` over split keys)."""
        return jax.vmap(self.sample)(jax.random.split(key, batch_size))

    def example(self) -> Episode:
        """One concrete episode (that of key 0), used to initialise learners (shapes and
        dtypes); drawn once per sampler object, as runs ask for it many times."""
        ex = getattr(self, "_example", None)
        if ex is None:
            ex = self.draw(jax.random.PRNGKey(0))
            if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(ex)):
                with contextlib.suppress(AttributeError):  # a sampler with __slots__: no memo
                    object.__setattr__(self, "_example", ex)  # frozen dataclasses too
        return ex

    def draw(self, key: Array) -> Episode:
        """`sample(key)` outside any trace (samplers that are pytrees compile it: one program
        instead of many small eager ones)."""
        return self.sample(key)

    def describe(self) -> dict:
        """A JSON-able description of the task distribution (saved as a run's tasks.json)."""
        return {"sampler": type(self).__name__}

    # Optional hooks, for samplers whose episodes have settings (N-way K-shot) or are drawn
    # from a dataset: `metalearn evaluate` passes its flags (`--ways 5`) to them by name.

    def replace(self, dataset: Any = None, **settings: Any) -> TaskSampler:
        """A copy with other episode settings (`ways=5`) or data: this sampler has none."""
        raise ValueError(f"{type(self).__name__} has no episode settings to change "
                         f"(asked for {sorted(settings) or 'another dataset'}); they are for "
                         "few-shot classification samplers")

    def setting_tag(self) -> str:
        """The episode setting as part of a file name (`5way_1shot_15query`)."""
        return type(self).__name__

    def for_dataset(self, spec: Any, on_error: str = "raise",
                    **settings: Any) -> tuple[TaskSampler, dict]:
        """This sampler's episodes (with `settings` changed) drawn from the dataset `spec` (a
        path in any form `tasks.load_dataset` reads), and what a result records of that
        dataset: this sampler draws from no dataset."""
        raise ValueError(f"{type(self).__name__} cannot take another dataset; dataset "
                         "evaluation is for few-shot image classification samplers")

    def episodes_from_manifest(self, path: Any) -> Episode:
        """The fixed episodes a manifest file lists, preprocessed as this sampler's: this
        sampler reads no manifests."""
        raise ValueError(f"{type(self).__name__} cannot read episode manifests; manifests are "
                         "for few-shot image samplers")


class InnerLearner:
    """Learns from an episode's support set and predicts its queries.

    Subclasses implement `init`, `adapt` and `predict`; `loss` follows from them (cross-entropy
    and accuracy for integer labels, 1/2 squared error for regression targets). A learner may
    override `loss` when its objective is not of that form, and the optional hooks below
    (each with a default that does nothing special).
    """

    # A batch's episodes run one after another (`lax.map`) instead of `vmap`ped: for learners
    # whose per-episode programs are large (the HyperTransformer generating conv layers). With
    # the default `loss`, only the predictions do; the adaptations stay `vmap`ped
    # (`episode_losses`).
    sequential_episodes: bool = False

    def for_evaluation(self) -> InnerLearner:
        """The learner that scores evaluations (e.g. MAML with more inner steps): itself."""
        return self

    def named_meta(self, name: str) -> MetaParams | None:
        """Meta-parameters the learner offers by name (`init_from=NAME`): None, it has none."""
        return None

    def init(self, key: Array, example: Episode) -> MetaParams:
        """Meta-parameters: what the outer loop trains."""
        raise NotImplementedError

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> TaskState:
        """Learn from the support set (generate weights, run Hebbian updates, read context)."""
        raise NotImplementedError

    def predict(self, meta: MetaParams, state: TaskState, query_x: Array) -> Array:
        """Predictions for the queries: logits [Q, classes] or regression outputs [Q(, dy)]."""
        raise NotImplementedError

    def loss(self, meta: MetaParams, episode: Episode, key: Array) -> tuple[Array, dict]:
        """Mean query loss of one episode and its metrics (`loss`, and `accuracy` if labelled)."""
        state = self.adapt(meta, episode.support(), key)
        preds = self.predict(meta, state, episode.query_x)
        return query_loss(preds, episode.query_y)


class Wrapper(InnerLearner):
    """A learner that is `self.learner` with another `loss` (e.g. extra metrics for evaluation):
    `init`, `adapt` and `predict` are the wrapped learner's. Subclasses are dataclasses with a
    `learner` field and define `loss`."""

    learner: InnerLearner

    def init(self, key: Array, example: Episode) -> MetaParams:
        """The wrapped learner's meta-parameters."""
        return self.learner.init(key, example)

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> TaskState:
        """The wrapped learner's adaptation."""
        return self.learner.adapt(meta, support, key)

    def predict(self, meta: MetaParams, state: TaskState, query_x: Array) -> Array:
        """The wrapped learner's predictions."""
        return self.learner.predict(meta, state, query_x)


def query_loss(preds: Array, targets: Array) -> tuple[Array, dict]:
    """Cross-entropy + accuracy for integer targets; 1/2 squared error for float targets."""
    if jnp.issubdtype(targets.dtype, jnp.integer):
        if preds.ndim != 2 or preds.shape[0] != targets.shape[0]:
            raise ValueError(f"classification predictions must be logits [Q, classes] for "
                             f"{targets.shape[0]} queries, got shape {preds.shape}")
        if not isinstance(targets, jax.core.Tracer):  # concrete labels: check their range
            check_label_range(np.asarray(targets), preds.shape[1])
        logp = jax.nn.log_softmax(preds.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
        acc = jnp.mean(jnp.argmax(preds, axis=-1) == targets)
        loss = jnp.mean(nll)
        return loss, {"loss": loss, "accuracy": acc}
    if preds.shape != targets.shape:
        if preds.ndim == 2 and targets.ndim == 1 and preds.shape[1] > 1:
            raise ValueError(f"targets are {targets.dtype} of shape {targets.shape} but the "
                             f"predictions are logits {preds.shape}: for classification use "
                             "integer labels (y.astype(jnp.int32)); for regression predict one "
                             "value per target")
        raise ValueError(f"regression predictions have shape {preds.shape} but targets have "
                         f"shape {targets.shape}")
    err = (preds - targets).reshape(targets.shape[0], -1)
    loss = 0.5 * jnp.mean(jnp.sum(err**2, axis=-1))
    return loss, {"loss": loss}


def check_label_range(labels: np.ndarray, columns: int, name: str = "labels",
                      who: str = "the learner") -> None:
    """Refuse integer labels outside [0, columns): they would index past the logits (NaN loss)."""
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"{name} include {lo}: class labels must be 0, 1, ..., classes - 1")
    if hi >= columns:
        raise ValueError(f"{name} go up to {hi} ({hi + 1} classes) but {who} predicts "
                         f"{columns} logit columns: give it at least {hi + 1} outputs (its "
                         "out_dim / ways / num_classes), or relabel the classes 0..N-1")


def check_predictions(learner: InnerLearner, meta: MetaParams, episode: Episode,
                      name: str = "episode") -> None:
    """Refuse, from shapes alone (no computation), a learner whose predictions cannot score the
    episode's targets: labels beyond its logit columns, or float targets under logits.

    Learners that only define `loss` (not `adapt`/`predict`) are left to `query_loss`."""
    def predict(m: MetaParams, e: Episode) -> Array:
        return learner.predict(m, learner.adapt(m, e.support(), jax.random.PRNGKey(0)),
                               e.query_x)

    try:
        preds = jax.eval_shape(predict, meta, episode)
    except NotImplementedError:
        return
    who = type(learner).__name__
    if episode.is_classification:
        if len(preds.shape) != 2:
            raise ValueError(f"{name}: integer labels need logits [Q, classes] but {who} "
                             f"predicts shape {preds.shape}")
        for field in ("support_y", "query_y"):
            check_label_range(np.asarray(getattr(episode, field)), preds.shape[1],
                              f"{name}.{field}", who)
    else:
        query_loss(jnp.zeros(preds.shape, preds.dtype), jnp.asarray(episode.query_y))


def episode_losses(learner: InnerLearner, meta: MetaParams, episodes: Episode,
                   key: Array) -> tuple[Array, dict]:
    """Per-episode losses [B] and metrics of a batch of episodes (leading axis), `vmap`ped
    (or, for a learner with `sequential_episodes`, run one after another with `lax.map`: the
    predictions only, after a `vmap`ped adaptation, where the learner's loss is the default
    adapt -> predict -> `query_loss`); episode i gets the learner key split(key, B)[i]."""
    keys = jax.random.split(key, jax.tree.leaves(episodes)[0].shape[0])
    if not learner.sequential_episodes:
        return jax.vmap(learner.loss, in_axes=(None, 0, 0))(meta, episodes, keys)
    if type(learner).loss is not InnerLearner.loss:
        return jax.lax.map(lambda a: learner.loss(meta, *a), (episodes, keys))
    states = jax.vmap(learner.adapt, in_axes=(None, 0, 0))(meta, episodes.support(), keys)
    return jax.lax.map(lambda a: query_loss(learner.predict(meta, a[0], a[1]), a[2]),
                       (states, episodes.query_x, episodes.query_y))


def batch_loss(learner: InnerLearner, meta: MetaParams, episodes: Episode,
               key: Array) -> tuple[Array, dict]:
    """Mean query loss over a batch of episodes (leading axis); metrics averaged."""
    losses, metrics = episode_losses(learner, meta, episodes, key)
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

"""Continual HyperTransformer (Vladymyrov, Zhmoginov, Sandler, TMLR 2024, arXiv 2301.04584).

Few-shot tasks t = 0, 1, ..., T-1 arrive one after another, each a support set S_t (N classes
x K shots) and a query set Q_t. The HyperTransformer (`metalearn.learners.hypertransformer`)
generates the CNN's conv weights from a support set; the continual version feeds the weights
it generated for the previous task back in with the next support set:

    theta_t = HT_psi(S_t, theta_{t-1}),        theta_{-1} = a learned tensor (meta-parameter),

so the generated weights themselves carry what was learned from S_0..S_{t-1}: no replay
buffer, no weight regularisation, no per-task architecture. Here theta_{t-1} enters where the
HyperTransformer's placeholder tokens are read: placeholder token j of layer l is
[mu_j ; theta_{t-1, l, j} ; 0...], theta_{t-1, l, j} being the raw slice (the transformer's
output before the 1/sqrt(fan-in) scaling) that the same token produced for task t-1, at the
very entries the new slice is read from. theta_{-1} starts at zero, so task 0 sees the
HyperTransformer's own token layout.

The generated CNN (`num_blocks` x conv-BN-ReLU-pool, no logits layer) maps an image to an
embedding f_{theta_t}(x). Classes are represented by task-aware prototypes c_{tau k}, the mean
embedding of class k's support images of task tau, so the embedding size stays fixed however
many classes accumulate. Logits are negative squared distances to the prototypes:

- task-incremental: a query of task tau is classified among task tau's prototypes;
- class-incremental: among every prototype of the tasks seen so far (tau <= t). A class seen in
  several tasks has several prototypes; its logit is their log-sum-exp, so the loss is the
  probability of the query's class, whichever task's prototype it is near.

Prototypes (`prototypes`): "frozen" (default) computes c_{tau k} once, with theta_tau and S_tau's
batch statistics, when task tau is learned, and keeps only those N vectors: queries of task tau
are later embedded with theta_t and compared with them. This is the replay-free reading of the
paper ("task-aware prototypes" kept as class representations): nothing of S_tau but its
prototypes survives task tau, and the generator must keep old prototypes valid. "recomputed"
re-embeds every stored support set S_0..S_t with theta_t; it needs the support images of every
past task (a replay memory used only for averaging, never for training) and is kept as the
alternative the paper's text leaves open.

Training (`loss`) unrolls the T tasks of an episode (`jax.lax.scan`, full backpropagation
through the recursion) and averages, after each task t, the prototypical loss of theta_t on
the query sets of tasks 0..t (Algorithm 1 of the paper, class-incremental by default;
`objective="task"` scores task-incrementally):

    J = mean_{t < T} mean_{tau <= t} L(Q_tau; theta_t, {c_{sigma k}}_{sigma <= t}).

Batch norm: each generated CNN theta_t normalises with the statistics of its own task's
labelled support S_t (as the HyperTransformer here does), and those are the statistics used when
theta_t embeds old tasks' queries. `recurrent=False` generates every theta_t from theta_{-1} and
S_t alone: a plain HyperTransformer run on each task independently, the baseline that forgets.
`merged=True` is the paper's MergedHT upper bound: theta_t = HT(S_0 + ... + S_t, theta_{-1}),
one generation from every support set so far given at once (each sample keeps its label token
within its own task: the generator's label embeddings are those of N-way tasks), prototypes
from that one CNN; not continual, it needs every past support set.
With T = 1 the model is a HyperTransformer with a prototypical head.

Episodes (`metalearn.tasks.continual.ContinualSampler`) hold the T tasks as consecutive equal
chunks of the support and the query sets, labelled by class over the whole sequence (0..
`classes` - 1); within a task the generator's label tokens are the ranks 0..N-1 of its labels.

`ConstPN` is the paper's Constant ProtoNet baseline on the same episodes: one fixed CNN (a
meta-learned embedding, not generated), task-aware prototypes and the same losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from metalearn import nn
from metalearn.core import Array, Episode, InnerLearner, MetaParams, PyTree, Support
from metalearn.learners.hypertransformer import HyperTransformer
from metalearn.learners.protonet import MASKED_LOGIT, class_prototypes, squared_distances
from metalearn.messages import setting

PROTOTYPES = ("frozen", "recomputed")
OBJECTIVES = ("class", "task")
MATRICES = ("ci_loss", "ci_accuracy", "ti_loss", "ti_accuracy")


def label_logits(proto_logits: Array, proto_labels: Array, allowed: Array,
                 classes: int) -> Array:
    """Per-class logits [Q, classes] from per-prototype ones [Q, P]: the log-sum-exp over the
    allowed prototypes of each class; `MASKED_LOGIT` for classes with none."""
    member = jax.nn.one_hot(proto_labels, classes, dtype=bool)  # [P, C] (label C: no class)
    ok = allowed[:, :, None] & member[None]  # [Q, P, C]
    out = jax.nn.logsumexp(jnp.where(ok, proto_logits[:, :, None], -jnp.inf), axis=1)
    return jnp.where(jnp.any(ok, axis=1), out, MASKED_LOGIT)


def _nll_accuracy(logits: Array, y: Array) -> tuple[Array, Array]:
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    return nll, (jnp.argmax(logits, axis=-1) == y).astype(logits.dtype)


class Continual:
    """The continual part of a learner: T tasks in order, task-aware prototypes, the losses of
    each step's model on the query sets seen so far. Subclasses are dataclasses with the fields
    `ways`, `tasks`, `classes`, `prototypes`, `objective` and define `_initial`, `_learn` and
    `_embed`."""

    ways: int
    tasks: int
    classes: int
    prototypes: str
    objective: str

    # ----- what a subclass defines
    def _initial(self, meta: MetaParams) -> PyTree:
        """What is carried into task 0 (the Continual HyperTransformer: theta_{-1})."""
        raise NotImplementedError

    def _learn(self, meta: MetaParams, carry: PyTree, x: Array, within: Array
               ) -> tuple[PyTree, PyTree, Array]:
        """Learn task t from its support (labels `within` in 0..ways-1): (the carry into task
        t+1, the model of step t, the support embeddings [S, D])."""
        raise NotImplementedError

    def _embed(self, meta: MetaParams, model: PyTree, x: Array) -> Array:
        """Embeddings [N, D] of `x` under the model of a step."""
        raise NotImplementedError

    # ----- shared
    def _check_continual(self) -> None:
        if min(self.ways, self.tasks) < 1 or self.classes < 0:
            raise ValueError(f"{type(self).__name__} needs ways, tasks >= 1 and classes >= 0 "
                             f"(0: tasks x ways), got {self.ways}, {self.tasks}, {self.classes}")
        if self.prototypes not in PROTOTYPES:
            raise ValueError(f"{type(self).__name__}.prototypes={self.prototypes!r}: use one of "
                             f"{', '.join(PROTOTYPES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{type(self).__name__}.objective={self.objective!r}: use class "
                             "(class-incremental) or task (task-incremental)")

    @property
    def num_classes(self) -> int:
        """Label columns: `classes`, or tasks x ways (every task new classes)."""
        return self.classes or self.tasks * self.ways

    def _check_example(self, example: Episode) -> Array:
        """The support images of one task, after checking the episode fits the learner."""
        x, y = jnp.asarray(example.support_x), jnp.asarray(example.support_y)
        name = type(self).__name__
        if x.ndim != 4:
            raise ValueError(f"{name} learns CNNs on images [N, H, W, C]; the support has "
                             f"shape {x.shape}")
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"{name} is a classifier: support_y must be integer labels")
        for field, n in (("support", x.shape[0]), ("query", example.query_x.shape[0])):
            if n % (self.tasks * self.ways):
                raise ValueError(
                    f"{name}: the {field} set has {n} images, not a multiple of tasks x ways = "
                    f"{self.tasks} x {self.ways}; episodes hold `tasks` equal chunks of `ways` "
                    f"classes (set {setting('tasks', 'learner.tasks', str(self.tasks))} to "
                    "the sampler's)")
        if int(jnp.max(y)) >= self.num_classes:
            raise ValueError(f"{name}: labels go up to {int(jnp.max(y))} but the learner has "
                             f"{self.num_classes} class columns; set "
                             f"{setting('classes', 'learner.classes', str(int(jnp.max(y)) + 1))}"
                             " or more")
        return x[:x.shape[0] // self.tasks]

    def _chunks(self, a: Array) -> Array:
        return a.reshape(self.tasks, a.shape[0] // self.tasks, *a.shape[1:])

    def _within(self, y: Array) -> tuple[Array, Array]:
        """A task's classes (sorted, [ways]) and each label's rank among them."""
        uniq = jnp.unique(y, size=self.ways, fill_value=self.num_classes)
        return uniq, jnp.searchsorted(uniq, y).astype(jnp.int32)

    def _run(self, meta: MetaParams, support: Support,
             score: Callable[[PyTree, Array, Array], PyTree] | None = None
             ) -> tuple[PyTree, Array, Array, PyTree]:
        """Learn the tasks in order: (the last step's model, prototypes [T, ways, D], their
        labels [T, ways] (`num_classes`: none), `score(model, prototypes, labels)` of every
        step stacked on a leading axis)."""
        if support.unlabeled_x is not None:
            raise ValueError(f"{type(self).__name__} learns from labelled support sets only; "
                             "sample episodes without unlabeled images")
        T, C = self.tasks, self.num_classes
        sx, sy = self._chunks(support.x), self._chunks(support.y)
        uniq, within = jax.vmap(self._within)(sy)
        emb_dim = jax.eval_shape(lambda m, x, w: self._learn(m, self._initial(m), x, w)[2],
                                 meta, sx[0], within[0]).shape[-1]

        def step(carry: tuple, inp: tuple) -> tuple[tuple, tuple]:
            state, protos, labels = carry
            t, x, w = inp
            state, model, emb = self._learn(meta, state, x, w)
            p, counts = class_prototypes(emb, w, self.ways)
            if self.prototypes == "recomputed":
                all_emb = self._embed(meta, model, sx.reshape(-1, *sx.shape[2:]))
                p_all, _ = jax.vmap(class_prototypes, in_axes=(0, 0, None))(
                    self._chunks(all_emb), within, self.ways)
                protos = jnp.where((jnp.arange(T) < t)[:, None, None], p_all, protos)
            protos = protos.at[t].set(p)
            labels = labels.at[t].set(jnp.where(counts > 0, uniq[t], C))
            out = score(model, protos, labels) if score is not None else ()
            return (state, protos, labels), (model, out)

        carry = (self._initial(meta), jnp.zeros((T, self.ways, emb_dim), sx.dtype),
                 jnp.full((T, self.ways), C, jnp.int32))
        (_, protos, labels), (models, outs) = jax.lax.scan(
            step, carry, (jnp.arange(T), sx, within))
        return jax.tree.map(lambda a: a[-1], models), protos, labels, outs

    def unroll(self, meta: MetaParams, episode: Episode) -> dict[str, Array]:
        """Per-step, per-task scores [T, T]: entry [t, tau] is the model after task t scored
        on task tau's queries (`MATRICES`: class- and task-incremental loss and accuracy;
        entries tau > t are zero)."""
        T, C = self.tasks, self.num_classes
        qx = episode.query_x
        qy = jnp.asarray(episode.query_y)
        nq = qx.shape[0] // T
        q_task = jnp.repeat(jnp.arange(T), nq)
        p_task = jnp.repeat(jnp.arange(T), self.ways)

        def score(model: PyTree, protos: Array, labels: Array) -> dict[str, Array]:
            emb = self._embed(meta, model, qx)
            d = -squared_distances(emb, protos.reshape(T * self.ways, -1))  # [T*nq, T*ways]
            flat = labels.reshape(-1)
            seen = (flat < C)[None, :]
            out = {}
            for name, allowed in (("ci", jnp.broadcast_to(seen, d.shape)),
                                  ("ti", seen & (p_task[None, :] == q_task[:, None]))):
                nll, acc = _nll_accuracy(label_logits(d, flat, allowed, C), qy)
                out[f"{name}_loss"] = jnp.mean(nll.reshape(T, nq), axis=1)
                out[f"{name}_accuracy"] = jnp.mean(acc.reshape(T, nq), axis=1)
            return out

        _, _, _, out = self._run(meta, episode.support(), score)
        seen = jnp.tril(jnp.ones((T, T), bool))
        return {k: jnp.where(seen, v, 0.0) for k, v in out.items()}

    def loss(self, meta: MetaParams, episode: Episode, key: Array) -> tuple[Array, dict]:
        """J: the mean over steps t and tasks tau <= t of theta_t's query loss on task tau;
        metrics: the final model's class- (`accuracy`) and task-incremental
        (`task_accuracy`) accuracy over all T tasks."""
        m = self.unroll(meta, episode)
        T = self.tasks
        obj = m["ci_loss"] if self.objective == "class" else m["ti_loss"]
        loss = jnp.sum(obj) / (T * (T + 1) / 2)
        return loss, {"loss": loss, "accuracy": jnp.mean(m["ci_accuracy"][-1]),
                      "task_accuracy": jnp.mean(m["ti_accuracy"][-1])}

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> dict:
        """Learn the tasks in order: the last model, every task's prototypes and labels."""
        model, protos, labels, _ = self._run(meta, support)
        return {"model": model, "prototypes": protos.reshape(-1, protos.shape[-1]),
                "labels": labels.reshape(-1)}

    def predict(self, meta: MetaParams, state: dict, query_x: Array) -> Array:
        """Class-incremental logits [Q, num_classes] under the model after the last task."""
        d = -squared_distances(self._embed(meta, state["model"], query_x), state["prototypes"])
        seen = jnp.broadcast_to((state["labels"] < self.num_classes)[None, :], d.shape)
        return label_logits(d, state["labels"], seen, self.num_classes)


NO_SLICES = ("ContinualHyperTransformer generates each task's CNN from the previous one: "
             "generated(meta, support) gives theta_0..theta_{T-1}")


@dataclasses.dataclass(frozen=True)
class ContinualHyperTransformer(Continual, HyperTransformer):
    """theta_t = HT(S_t, theta_{t-1}): the HyperTransformer's generator, fed its own previous
    weights; a prototypical head over task-aware prototypes (module docstring)."""

    ways: int = 5  # N: classes per task (the generator's label tokens)
    channels: int = 8
    num_blocks: int = 4
    tasks: int = 5  # T: tasks per episode
    classes: int = 0  # label columns (0: tasks x ways)
    prototypes: str = "frozen"  # or "recomputed" (module docstring)
    objective: str = "class"  # training loss: class- or task-incremental
    recurrent: bool = True  # False: every task from theta_{-1} (a HyperTransformer per task)
    merged: bool = False  # MergedHT: theta_t = HT(S_0 + ... + S_t, theta_{-1}), all at once

    def __post_init__(self) -> None:
        HyperTransformer.__post_init__(self)
        self._check_continual()
        if self.batch_norm != "support":
            raise ValueError("ContinualHyperTransformer normalises with each task's support "
                             "statistics (batch_norm='support'); a query batch's own "
                             "statistics would mix the tasks being scored")
        if self.merged and not self.recurrent:
            raise ValueError("ContinualHyperTransformer: merged=True (every support set at "
                             "once) and recurrent=False exclude each other; choose one")
        if self.trained_blocks >= self.num_blocks:
            raise ValueError("ContinualHyperTransformer generates conv layers (it has no "
                             "logits layer): trained_blocks must be < num_blocks, got "
                             f"{self.trained_blocks} of {self.num_blocks}")

    @property
    def embedding(self) -> nn.CNN:
        """The generated model: the CNN without a head (flattened features)."""
        return nn.CNN(self.channels, self.num_blocks, block_order=self.block_order)

    def init(self, key: Array, example: Episode) -> MetaParams:
        """The HyperTransformer's conv generators (no logits generator) and theta_{-1}."""
        x = self._check_example(example)
        meta = self._init_meta(key, x, logits=False)
        meta["initial"] = [jnp.zeros((slices, size), x.dtype)
                           for _, slices, size in self._layer_shapes(x)[:-1]]
        return meta

    def _initial(self, meta: MetaParams) -> list[Array]:
        return meta["initial"]

    def _run(self, meta: MetaParams, support: Support,
             score: Callable[[PyTree, Array, Array], PyTree] | None = None
             ) -> tuple[PyTree, Array, Array, PyTree]:
        if not self.merged:
            return super()._run(meta, support, score)
        # MergedHT: step t sees the support sets of tasks 0..t at once (one generation of a
        # growing token set, unrolled), and its prototypes come from that one CNN
        T, C = self.tasks, self.num_classes
        sx, sy = self._chunks(support.x), self._chunks(support.y)
        uniq, within = jax.vmap(self._within)(sy)
        outs, model = [], None
        for t in range(T):
            x, w = sx[:t + 1].reshape(-1, *sx.shape[2:]), within[:t + 1].reshape(-1)
            blocks, stats, h, _, _ = self._generate_blocks(meta, x, w, x.shape[0],
                                                           meta["initial"])
            model = (blocks, stats)
            emb = h.reshape(t + 1, sx.shape[1], -1)
            p, counts = jax.vmap(class_prototypes, in_axes=(0, 0, None))(
                emb, within[:t + 1], self.ways)
            protos = jnp.zeros((T, self.ways, p.shape[-1]), p.dtype).at[:t + 1].set(p)
            labels = jnp.full((T, self.ways), C, jnp.int32).at[:t + 1].set(
                jnp.where(counts > 0, uniq[:t + 1], C))
            if score is not None:
                outs.append(score(model, protos, labels))
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else ()
        return model, protos, labels, stacked

    def _learn(self, meta: MetaParams, carry: list[Array], x: Array, within: Array
               ) -> tuple[list[Array], tuple, Array]:
        previous = carry if self.recurrent else meta["initial"]
        blocks, stats, h, _, raws = self._generate_blocks(meta, x, within, x.shape[0], previous)
        return raws, (blocks, stats), h.reshape(x.shape[0], -1)

    def _embed(self, meta: MetaParams, model: tuple, x: Array) -> Array:
        blocks, stats = model
        return self.embedding.apply({"blocks": blocks}, x, stats)[0]

    def conv_slices(self, meta: MetaParams, support: Support) -> list[Array]:
        """Not defined for a task sequence: `generated` gives theta_0..theta_{T-1}."""
        raise TypeError(NO_SLICES)

    def adapt_with_slices(self, meta: MetaParams, support: Support,
                          slices: Sequence[Array] | None) -> dict:
        """Not defined for a task sequence (it has no logits generator)."""
        raise TypeError(NO_SLICES)

    def generated(self, meta: MetaParams, support: Support) -> list[PyTree]:
        """The CNN parameters theta_0..theta_{T-1} generated along the support's tasks."""
        sx, sy = self._chunks(support.x), self._chunks(support.y)
        within = jax.vmap(self._within)(sy)[1]
        carry, out = self._initial(meta), []
        for t in range(self.tasks):
            if self.merged:
                x = sx[:t + 1].reshape(-1, *sx.shape[2:])
                blocks = self._generate_blocks(meta, x, within[:t + 1].reshape(-1),
                                               x.shape[0], meta["initial"])[0]
            else:
                carry, (blocks, _), _ = self._learn(meta, carry, sx[t], within[t])
            out.append({"blocks": blocks})
        return out


@dataclasses.dataclass(frozen=True)
class ConstPN(Continual, InnerLearner):
    """Constant ProtoNet (the paper's ConstPN): one meta-learned CNN embeds every task;
    task-aware prototypes and the continual losses as `ContinualHyperTransformer`."""

    ways: int = 5
    tasks: int = 5
    classes: int = 0
    channels: int = 8
    num_blocks: int = 4
    prototypes: str = "frozen"
    objective: str = "class"

    def __post_init__(self) -> None:
        self._check_continual()

    @property
    def embedding(self) -> nn.CNN:
        """The fixed embedding: the CNN without a head."""
        return nn.CNN(self.channels, self.num_blocks)

    def init(self, key: Array, example: Episode) -> MetaParams:
        """The CNN's parameters."""
        return {"cnn": self.embedding.init(key, self._check_example(example))}

    def _initial(self, meta: MetaParams) -> tuple:
        return ()

    def _learn(self, meta: MetaParams, carry: tuple, x: Array, within: Array
               ) -> tuple[tuple, list, Array]:
        emb, stats = self.embedding.apply(meta["cnn"], x)
        return carry, stats, emb

    def _embed(self, meta: MetaParams, model: list, x: Array) -> Array:
        return self.embedding.apply(meta["cnn"], x, model)[0]

"""Prototypical networks (Snell et al. 2017) with the semi-supervised refinement (Ren et al. 2018).

An embedding f_phi (by default the 4-block few-shot CNN of `metalearn.nn`; any model of the
`metalearn.nn.Model` contract, e.g. an MLP on vector data) maps inputs to vectors. `adapt`
averages the support embeddings of each class into a prototype p_c = mean_{i: y_i = c} f(x_i);
`predict` scores a query by logits_c(x) = -||f(x) - p_c||^2. The meta-parameters are phi alone.

With unlabeled support samples u_j (`Support.unlabeled_x`), each of `refine_steps` soft k-means
steps assigns them to classes, z_jc = softmax_c(-||f(u_j) - p_c||^2), and refines
p_c <- (sum_i [y_i = c] f(x_i) + sum_j z_jc f(u_j)) / (n_c + sum_j z_jc) (Ren et al., eq. 3).

Batch norm uses the statistics of the adapt-time batch (labelled support plus unlabeled
samples), and queries are normalised with those same statistics, in training and evaluation
alike: a query's logits depend on the support set and on that query only.

The number of ways is not a static property of an episode, so the logits have `num_classes`
columns (default: one per support example, an upper bound on the ways); columns of labels that
have no support example are `MASKED_LOGIT` and never win nor carry probability.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metalearn.core import Array, Episode, InnerLearner, MetaParams, Support
from metalearn.nn import CNN, Model, check_block_order

MASKED_LOGIT = -1e30


def squared_distances(a: Array, b: Array) -> Array:
    """||a_i - b_j||^2 for a [N, D] and b [K, D] -> [N, K] (direct, no cancellation)."""
    return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)


def class_prototypes(emb: Array, labels: Array, num_classes: int) -> tuple[Array, Array]:
    """Mean embedding per class [K, D] and per-class support counts [K]."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=emb.dtype)  # [S, K]
    counts = jnp.sum(onehot, axis=0)
    protos = (onehot.T @ emb) / jnp.maximum(counts, 1.0)[:, None]
    return protos, counts


def prototype_logits(emb: Array, protos: Array, present: Array) -> Array:
    """-||f(x) - p_c||^2 for present classes, MASKED_LOGIT for the others: [N, K]."""
    return jnp.where(present[None, :], -squared_distances(emb, protos), MASKED_LOGIT)


def soft_kmeans_refine(protos: Array, counts: Array, labeled_sum: Array, unlabeled: Array,
                       steps: int = 1) -> Array:
    """Ren et al. (2018) soft k-means refinement of prototypes with unlabeled embeddings."""
    present = counts > 0
    for _ in range(steps):
        z = jax.nn.softmax(prototype_logits(unlabeled, protos, present), axis=-1)  # [U, K]
        protos = (labeled_sum + z.T @ unlabeled) / (counts + jnp.sum(z, axis=0))[:, None]
        protos = jnp.where(present[:, None], protos, 0.0)
    return protos


@dataclasses.dataclass(frozen=True)
class ProtoNet(InnerLearner):
    """Prototypical network; logits = -squared distance to the class prototypes.

    The embedding is `embedding` (any `metalearn.nn.Model`, e.g. `MLP(hidden=(64,),
    out_dim=32)`), or by default the conv-BN-ReLU-pool CNN of `channels` x `num_blocks`.
    """

    channels: int = 64  # width of every conv block (default embedding)
    num_blocks: int = 4
    refine_steps: int = 1  # soft k-means steps when the support has unlabeled samples
    num_classes: int | None = None  # logit columns; None: one per support example
    embedding: Model | None = None  # None: CNN(channels, num_blocks, block_order=...)
    block_order: str = "conv-bn-relu-pool"  # of the default CNN (`metalearn.nn.BLOCK_ORDERS`)

    def __post_init__(self) -> None:
        check_block_order("ProtoNet", self.block_order)

    def init(self, key: Array, example: Episode) -> MetaParams:
        """The embedding's parameters (the CNN: He-normal kernels, BN scale 1 and shift 0)."""
        x = example.support_x
        if self.embedding is None and x.ndim != 4:
            raise ValueError(f"ProtoNet's default embedding is a CNN on images: support_x must "
                             f"be [S, H, W, C], got shape {x.shape}; for other inputs give an "
                             "embedding model, e.g. ProtoNet(embedding=MLP(hidden=(64,), "
                             "out_dim=32))")
        if not example.is_classification:
            raise ValueError("ProtoNet is a classifier: support_y must be integer class labels")
        return {self.params_key: self.model.init(key, x)}

    @property
    def params_key(self) -> str:
        """Where the meta-parameters hold the embedding's: "cnn" (the default) or "embedding"."""
        return "cnn" if self.embedding is None else "embedding"

    @property
    def model(self) -> Model:
        """The embedding f_phi (the CNN without a head by default)."""
        return self.embedding or CNN(self.channels, self.num_blocks,
                                     block_order=self.block_order)

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> dict:
        """Class prototypes (refined with unlabeled samples) and the support's BN statistics."""
        n_lab = support.x.shape[0]
        k = self.num_classes or n_lab
        x = support.x if support.unlabeled_x is None else jnp.concatenate(
            [support.x, support.unlabeled_x.astype(support.x.dtype)], axis=0)
        emb, stats = self.model.apply(meta[self.params_key], x)
        with jax.named_scope("prototypes"):
            protos, counts = class_prototypes(emb[:n_lab], support.y, k)
        if support.unlabeled_x is not None and support.unlabeled_x.shape[0] > 0 \
                and self.refine_steps > 0:
            protos = soft_kmeans_refine(protos, counts, protos * counts[:, None], emb[n_lab:],
                                        self.refine_steps)
        return {"prototypes": protos, "present": counts > 0, "bn": stats}

    def predict(self, meta: MetaParams, state: dict, query_x: Array) -> Array:
        """Logits [Q, num_classes]: negative squared distance to each class prototype."""
        emb, _ = self.model.apply(meta[self.params_key], query_x, state["bn"])
        with jax.named_scope("prototypes"):
            return prototype_logits(emb, state["prototypes"], state["present"])

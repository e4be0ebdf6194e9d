"""HyperTransformer (Zhmoginov, Sandler, Vladymyrov, ICML 2022): a transformer writes the CNN.

The target model is the few-shot CNN of `metalearn.nn` (4 blocks of 3x3 conv -> batch norm ->
ReLU -> 2x2 max-pool) with a flatten-and-dense logits layer of `ways` classes. Its weights
theta are not meta-learned but *generated* from the support set, layer by layer:

    theta_l = G_l({(x_i, c_i)}, z^l),   z^l_i = CNN_{theta_1..theta_{l-1}}(x_i),

where z^l_i is support image i's input activation to layer l under the layers generated so far.
G_l is an encoder-only transformer (post-LayerNorm, no positional encoding, `num_layers`
layers of `heads` heads; query/key, value and feed-forward sizes `width_fraction` x the token
width) over one token per support sample and one learned placeholder token mu_j per weight
slice j:

    sample token    [xi(c_i) ; h^l(z^l_i) ; s(x_i) ; 0...]     (c_i = `ways` if unlabeled)
    placeholder     [mu_j ; 0...]

xi: label embeddings (d = `embed_dim`; one extra for "unlabeled", xi-hat), h^l: a per-layer conv
feature extractor of the activations (two 3x3 convs of `local_features` channels, the mean of
each conv's output over space, concatenated; one conv for the logits layer), s: a shared image
feature extractor (four 3x3 convs of `shared_features` channels, the first three with stride 2,
ReLU, global mean), computed once per image. The outputs at the placeholders, past their first
d entries, are the weight slices: one per output channel for a conv (its 3 x 3 x C_in kernel),
one per class for the logits layer (its weight row and bias). Each slice is scaled by
1/sqrt(fan-in) (He-style), so the generated layers start in the range an initialised CNN has;
the transformer's LayerNorm-ed outputs are otherwise of unit scale whatever the width.

Initialisation (ours; the paper does not say): trained from random transformer weights, the
generator sits on a plateau where every class gets the same logits row (loss ln N: on synthetic
20-way tasks it never left it in 1,200 steps, nor on Omniglot in 1,440), because reading the
labels needs two maps that are each useless without the other: placeholder j attending to the
samples of class j, and the values carrying their features into the weight slice. So each
transformer layer starts with equal query and key weights and identity value and output maps,
and the logits generator's placeholder j starts as a copy of label j's embedding: placeholder j
then attends to the samples labelled j and copies their features (which the token layout puts
where the weight slice is read) into its output, a prototype-like classifier to start from.
Every weight stays free to train; on the synthetic 20-way tasks this left the plateau after
about 400 steps. The conv generators start from random weights: their kernels then start
nearly parallel across output channels (mean |cos| 0.58-0.81 between an 8-channel layer's
kernels, against 0.09-0.26 for an initialised CNN), and generating all layers on Omniglot
(8 channels, Adam 1e-3, 4 episodes per step) holds the loss at ln 20 for 200-250 steps before
it falls (at 3e-3 it had not fallen after 600). Starting each conv placeholder with a random
kernel in its padding instead left the plateau no sooner (300-350 steps), so the tokens keep
the paper's layout.

Batch-norm scale and shift are meta-parameters, not generated (as in the paper). Batch-norm
statistics (`batch_norm`): "support" (default) takes them from the labelled support set, at
every layer, and reuses them for the queries, as ProtoNet and MAML here do: a query's
prediction depends on the support set and on that query alone. "batch" is the official code's
handling (its BN always runs in training mode): the queries are normalised with their own
batch's statistics, in training and evaluation, so a query's prediction depends on the other
queries of its batch (transductive); generation still sees the support's statistics.

Differences from the official TensorFlow code (google-research `hypertransformer/tf`), and why:
- Block order (`block_order`): conv -> BN -> ReLU -> 2x2 max-pool by default (`metalearn.nn`'s
  few-shot CNN, shared with ProtoNet and MAML so the widths compare); "conv-relu-pool-bn" is the
  official conv -> ReLU -> max-pool -> BN (BN statistics then those of the pooled
  activations). At 4 channels under the paper's SGD, ours died: the last block's positive
  activations ended up only in the row and column of its 3x3 map that the 2x2 pool drops,
  leaving every feature 0; the official order trained with the same recipe
  (docs/fewshot_omniglot.md).
- Generated-weight scaling: each slice is divided by sqrt(fan-in); the official code reshapes
  the transformer's output into the kernel as it is.
- Initialisation of the logits generator (matched query/key, identity value/output maps,
  placeholders copying the label embeddings; above): ours, to leave the ln N plateau.
- Token layout, label embeddings (with xi-hat), placeholders, the shared 4-conv feature
  extractor (stride 2 but the last, global mean) and layer-by-layer generation follow the
  official code, as do the per-layer activation features h^l (two 3x3 convs, stride 2 then 1,
  ReLU between, the pre-activation spatial means concatenated; one conv for the logits layer),
  except that ours pad "same" (the official "valid", shrinking the kernel on maps under 3x3),
  so every layer's features have one shape.
- Width of h^l: `local_features` is its own field (8 by default); the released scripts tie it
  to the CNN's channels (8 for their 8-channel CNN). A wider CNN should widen it too: h^l is
  the only way a support image's activations reach its token, and at 64 channels a width of 8
  cost the logits-only model accuracy (docs/fewshot_omniglot.md, the Vinyals protocol).
- Batch-norm statistics at evaluation: `batch_norm` (above); "support" by default.
- Episodes: support and query images are distinct (the official sampler draws them
  independently, so a query can repeat a support image).

Modes: `trained_blocks = k` keeps the first k conv blocks as ordinary meta-parameters and
generates the rest (k = `num_blocks`: the paper's "logits only" mode for wide CNNs); the logits
layer is always generated. `learned_base=True` adds each generated conv kernel to a learned one,
theta_l = W_l + G_l(...) (the official code's `--add_trainable_weights`, off in its scripts); the
logits layer gets no base, since class j is a different class in every episode. On Omniglot
at 8 channels it learns far faster than generating the kernels alone (validation 62 % against
24 % after 2,000 x 4 episodes; README, `ht_omniglot`).
Semi-supervised: unlabeled support images (`Support.unlabeled_x`) enter as tokens with the
label embedding xi-hat; they shape the generated weights but not the batch statistics. Labels
without a support image get masked logits (`MASKED_LOGIT`), so a model generated for 20 ways is
evaluated 5-way on its first five classes.

Everything is trained end to end by the outer loop on the query cross-entropy: there is no inner
optimisation, and the generated weights do not depend on the order of the support samples.
`adapt` returns the generated CNN in the parameter layout of `metalearn.nn.CNN`
(`{"blocks": [{"w", "scale", "shift"}, ...], "head": {"w", "b"}}`) with the support statistics;
`predict` runs that CNN. `conv_slices` gives the generated conv layers' raw slices and
`adapt_with_slices` adapts with given ones (the logits layer still generated), e.g. their mean
over episodes, to measure how task-specific the kernels are (examples/generated_kernels.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from metalearn import nn
from metalearn.core import Array, Episode, InnerLearner, MetaParams, PyTree, Support
from metalearn.learners.protonet import MASKED_LOGIT
from metalearn.messages import setting

# The support's convolutions: a batch's episodes are generated together (`vmap`), each with its
# own kernels, which patch products batch as matrix products (`nn.conv2d_patches`).
SUPPORT_OPS = "patches"


def _conv_features(convs: list[Array], x: Array, strides: tuple[int, ...]) -> Array:
    """Means over space of each conv's output (pre-activation), ReLU between convs: [N, F]."""
    out, h = [], x
    for i, (w, s) in enumerate(zip(convs, strides, strict=True)):
        h = nn.conv2d_patches(h, w, s)
        out.append(jnp.mean(h, axis=(1, 2)))
        if i + 1 < len(convs):
            h = jax.nn.relu(h)
    return jnp.concatenate(out, axis=-1)


def _matched(layer: dict) -> dict:
    """A transformer layer's starting point: query = key weights (a token first attends to
    tokens like itself), identity value and output maps (it first copies what it attends to)."""
    width, d = layer["value"]["w"].shape
    return {**layer, "key": jax.tree.map(lambda a: a + 0.0, layer["query"]),
            "value": {**layer["value"], "w": jnp.eye(width, d)},
            "out": {**layer["out"], "w": jnp.eye(d, width)}}


@dataclasses.dataclass(frozen=True)
class HyperTransformer(InnerLearner):
    """A transformer per CNN layer generates that layer's weights from the support set."""

    ways: int = 20
    channels: int = 8
    num_blocks: int = 4
    trained_blocks: int = 0  # first k conv blocks learned, not generated (num_blocks: logits only)
    learned_base: bool = False  # generated conv kernels are added to learned ones
    embed_dim: int = 32  # d: label and placeholder embeddings
    shared_features: int = 32  # width of the shared image feature extractor (0: none)
    local_features: int = 8  # width of each layer's activation feature extractor
    num_layers: int = 3  # transformer layers per generated CNN layer
    heads: int = 2
    width_fraction: float = 1.0  # nu: query/key, value and inner sizes / token width
    # With conv kernels generated per episode, a batch's episodes are generated together
    # (vmap) and their query CNNs run one after another (lax.map): vmapped, the query CNN's
    # convolutions become grouped ones, which XLA:CPU runs slowly (benchmarks/
    # hypertransformer.py). Same numbers either way; False where grouped convolutions are fast
    # (accelerators).
    sequential: bool = True
    batch_norm: str = "support"  # query statistics: "support" (ours) or "batch" (official)
    block_order: str = "conv-bn-relu-pool"  # or "conv-relu-pool-bn" (official; nn.BLOCK_ORDERS)

    @property
    def sequential_episodes(self) -> bool:
        """True when `episode_losses` runs a batch's query CNNs in sequence (`sequential`)."""
        return self.sequential and self.trained_blocks < self.num_blocks

    def __post_init__(self) -> None:
        if self.ways < 1 or self.channels < 1 or self.num_blocks < 1:
            raise ValueError(f"HyperTransformer needs ways, channels and num_blocks >= 1, got "
                             f"{self.ways}, {self.channels}, {self.num_blocks}")
        if not 0 <= self.trained_blocks <= self.num_blocks:
            raise ValueError(f"HyperTransformer.trained_blocks must be in 0..num_blocks="
                             f"{self.num_blocks} (num_blocks: logits only), got "
                             f"{self.trained_blocks}")
        if self.batch_norm not in ("support", "batch"):
            raise ValueError(f"HyperTransformer.batch_norm={self.batch_norm!r}: use support "
                             "(queries normalised with the support's statistics) or batch "
                             "(each query batch its own, as the official code)")
        nn.check_block_order("HyperTransformer", self.block_order)
        if min(self.embed_dim, self.local_features, self.num_layers, self.heads) < 1 \
                or self.shared_features < 0 or self.width_fraction <= 0:
            raise ValueError("HyperTransformer needs embed_dim, local_features, num_layers, "
                             "heads >= 1, shared_features >= 0 and width_fraction > 0")

    @property
    def cnn(self) -> nn.CNN:
        """The target model: the few-shot CNN with a `ways`-class logits layer."""
        return nn.CNN(self.channels, self.num_blocks, out_dim=self.ways,
                      block_order=self.block_order)

    # ----- shapes
    def _layer_shapes(self, example_x: Array) -> list[tuple[int, int, int]]:
        """(input channels, slices, slice size) of each generated layer, logits last."""
        c_in, out = example_x.shape[-1], []
        for i in range(self.num_blocks):
            if i >= self.trained_blocks:
                out.append((c_in, self.channels, 9 * c_in))
            c_in = self.channels
        h, w = example_x.shape[1] >> self.num_blocks, example_x.shape[2] >> self.num_blocks
        out.append((self.channels, self.ways, self.channels * h * w + 1))  # 2x2 pools, floor
        return out

    def _token_width(self, slice_size: int, local: int) -> int:
        return self.embed_dim + max(slice_size, local + self.shared_features)

    # ----- meta-parameters
    def init(self, key: Array, example: Episode) -> MetaParams:
        """CNN batch-norm (and trained blocks'), feature extractors, one generator per layer."""
        x = jnp.asarray(example.support_x)
        if x.ndim != 4:
            raise ValueError(f"HyperTransformer generates a CNN for images [N, H, W, C]; the "
                             f"support has shape {x.shape}")
        y = jnp.asarray(example.support_y)
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError("HyperTransformer is a classifier: support_y must be integer "
                             "labels")
        if int(jnp.max(y)) >= self.ways:
            raise ValueError(f"episodes have {int(jnp.max(y)) + 1} classes but the "
                             f"HyperTransformer generates a {self.ways}-way logits layer; set "
                             f"{setting('ways', 'learner.ways', str(int(jnp.max(y)) + 1))} or more")
        return self._init_meta(key, x, logits=True)

    def _init_meta(self, key: Array, x: Array, logits: bool) -> MetaParams:
        """The meta-parameters for images like `x`: a generator per generated conv layer and,
        with `logits`, one for the logits layer (last)."""
        k_cnn, k_shared, k_gen = jax.random.split(key, 3)
        cnn = self.cnn.init(k_cnn, x)
        blocks = [{"scale": b["scale"], "shift": b["shift"],
                   **({"w": b["w"]} if i < self.trained_blocks or self.learned_base else {})}
                  for i, b in enumerate(cnn["blocks"])]
        meta: dict = {"cnn": {"blocks": blocks}, "generators": []}
        if self.shared_features:
            ks = jax.random.split(k_shared, 4)
            widths = [x.shape[-1]] + [self.shared_features] * 4
            meta["shared"] = [nn.init_conv(k, a, b) for k, a, b in
                              zip(ks, widths[:-1], widths[1:], strict=True)]
        shapes = self._layer_shapes(x)[:None if logits else -1]
        meta["generators"] = [
            self._init_generator(k, c_in, slices, size, logits and i == len(shapes) - 1)
            for i, (k, (c_in, slices, size)) in enumerate(
                zip(jax.random.split(k_gen, len(shapes)), shapes, strict=True))]
        return meta

    def _init_generator(self, key: Array, c_in: int, slices: int, size: int,
                        logits: bool) -> dict:
        """G_l: the activation features h^l, the transformer, label embeddings xi (`ways` + 1,
        the last for "unlabeled") and placeholders mu_j of one generated layer."""
        n_conv = 1 if logits else 2
        width = self._token_width(size, n_conv * self.local_features)
        kf, kt, kl, kp = jax.random.split(key, 4)
        fe_widths = [c_in] + [self.local_features] * n_conv
        labels = jax.random.normal(kl, (self.ways + 1, self.embed_dim))
        return {
            "features": [nn.init_conv(kk, a, b) for kk, a, b in zip(
                jax.random.split(kf, n_conv), fe_widths[:-1], fe_widths[1:], strict=True)],
            "transformer": [_matched(lay) if logits else lay for lay in nn.init_transformer(
                kt, width, self.num_layers, self.heads, self.width_fraction)],
            "labels": labels,
            # the logits generator's placeholder j starts as a copy of label j's embedding
            "placeholders": labels[:self.ways] + 0.0 if logits else
            jax.random.normal(kp, (slices, self.embed_dim))}

    # ----- generation
    def _shared(self, meta: MetaParams, x: Array) -> Array:
        """s(x): four 3x3 convs (ReLU; stride 2 but the last), global mean: [N, shared]."""
        if not self.shared_features:
            return jnp.zeros((x.shape[0], 0), x.dtype)
        h = x
        last = len(meta["shared"]) - 1
        for i, w in enumerate(meta["shared"]):
            h = jax.nn.relu(nn.conv2d_patches(h, w, 1 if i == last else 2))
        return jnp.mean(h, axis=(1, 2))

    def _generate(self, gen: dict, acts: Array, token_labels: Array, shared: Array,
                  slices: int, size: int, previous: Array | None = None) -> Array:
        """Weight slices [slices, size] from the tokens of the support samples; `previous`
        [slices, size] fills each placeholder token where its slice is read (the Continual
        HyperTransformer's theta_{t-1}), zeros otherwise."""
        n_conv = len(gen["features"])
        local = _conv_features(gen["features"], acts, (2, 1)[:n_conv])
        feats = jnp.concatenate([gen["labels"][token_labels], local, shared], axis=-1)
        width = self._token_width(size, local.shape[-1])
        samples = jnp.pad(feats, ((0, 0), (0, width - feats.shape[-1])))
        holders = gen["placeholders"] if previous is None else jnp.concatenate(
            [gen["placeholders"], previous.astype(feats.dtype)], axis=-1)
        holders = jnp.pad(holders, ((0, 0), (0, width - holders.shape[-1])))
        out = nn.transformer(gen["transformer"], jnp.concatenate([holders, samples]),
                             self.heads)
        return out[:slices, self.embed_dim:self.embed_dim + size]

    def _tokens(self, support: Support) -> tuple[Array, Array]:
        """The support images, unlabeled ones last, and their token labels (`ways`: none)."""
        n = support.x.shape[0]
        x = support.x if support.unlabeled_x is None else jnp.concatenate(
            [support.x, support.unlabeled_x])
        labels = jnp.concatenate([support.y, jnp.full((x.shape[0] - n,), self.ways,
                                                      support.y.dtype)])
        return x, labels

    def _generate_blocks(self, meta: MetaParams, x: Array, labels: Array, n: int,
                         previous: list[Array] | None = None,
                         fixed: Sequence[Array] | None = None
                         ) -> tuple[list[dict], list, Array, Array, list[Array]]:
        """The conv blocks, generated in order from tokens of `x` (the first `n` labelled:
        their statistics normalise every block): (blocks, statistics, output activations,
        shared features, each generated layer's raw slices). `previous`: one [slices, size]
        array per generated conv layer for the placeholder tokens (`_generate`); `fixed`: one
        per generated conv layer used instead of generating it."""
        shared = self._shared(meta, x)
        shapes = iter(self._layer_shapes(x[:1]))
        gens = iter(meta["generators"])
        prev = iter(previous or [])
        given = iter(fixed or [])
        blocks, stats, raws, h = [], [], [], x
        for i, bn in enumerate(meta["cnn"]["blocks"]):
            if i < self.trained_blocks:
                w = bn["w"]
            else:
                c_in, slices, size = next(shapes)
                gen = next(gens)
                raw = next(given) if fixed is not None else self._generate(
                    gen, h, labels, shared, slices, size,
                    next(prev) if previous is not None else None)
                raws.append(raw)
                w = jnp.moveaxis(raw.reshape(slices, 3, 3, c_in), 0, -1) / math.sqrt(size)
                if self.learned_base:
                    w = w + bn["w"]
            s = None  # the labelled support's statistics: the whole batch's unless unlabeled
            if n < h.shape[0] and self.block_order == "conv-bn-relu-pool":
                s = nn.batch_stats(nn.conv2d(h[:n], w, SUPPORT_OPS))
            elif n < h.shape[0]:
                s = nn.cnn_block(h[:n], w, bn["scale"], bn["shift"], ops=SUPPORT_OPS,
                                 order=self.block_order)[1]
            h, s = nn.cnn_block(h, w, bn["scale"], bn["shift"], s, ops=SUPPORT_OPS,
                                order=self.block_order)
            blocks.append({"w": w, "scale": bn["scale"], "shift": bn["shift"]})
            stats.append(s)
        return blocks, stats, h, shared, raws

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> dict:
        """Generate the CNN layer by layer; returns its parameters and the support statistics."""
        return self.adapt_with_slices(meta, support, None)

    def conv_slices(self, meta: MetaParams, support: Support) -> list[Array]:
        """The raw weight slices [slices, size] of each generated conv layer for `support`."""
        x, labels = self._tokens(support)
        return self._generate_blocks(meta, x, labels, support.x.shape[0])[4]

    def adapt_with_slices(self, meta: MetaParams, support: Support,
                          slices: Sequence[Array] | None) -> dict:
        """`adapt` with the generated conv layers' raw slices given (`conv_slices`' layout; None:
        generated): the logits layer is still generated from `support` through that CNN, so
        e.g. the slices averaged over episodes measure what task-specific kernels add."""
        x, labels = self._tokens(support)
        blocks, stats, h, shared, _ = self._generate_blocks(meta, x, labels, support.x.shape[0],
                                                            fixed=slices)
        _, slices, size = self._layer_shapes(support.x[:1])[-1]
        raw = self._generate(meta["generators"][-1], h, labels, shared, slices, size)
        head = {"w": raw[:, :-1].T / math.sqrt(size - 1), "b": raw[:, -1]}
        present = jnp.zeros((self.ways,), bool).at[support.y].set(True)
        return {"params": {"blocks": blocks, "head": head}, "stats": stats, "present": present}

    def predict(self, meta: MetaParams, state: dict, query_x: Array) -> Array:
        """Logits [Q, ways] of the generated CNN; classes without support images masked."""
        stats = state["stats"] if self.batch_norm == "support" else None  # None: the batch's
        logits, _ = self.cnn.apply(state["params"], query_x, stats)
        return jnp.where(state["present"][None, :], logits, MASKED_LOGIT)

    def generated(self, meta: MetaParams, support: Support) -> PyTree:
        """The CNN parameters generated for `support` (the `metalearn.nn.CNN` layout)."""
        return self.adapt(meta, support, None)["params"]

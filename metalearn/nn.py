"""Neural-network building blocks as pure functions of explicit parameter pytrees.

The few-shot CNN here is the one the few-shot literature (Vinyals et al. 2016, Snell et al.
2017, MAML) and the HyperTransformer paper use: four blocks of

    3x3 conv ('same', no bias) -> batch norm (learned scale and shift) -> ReLU -> 2x2 max-pool

(`conv_bn_relu_pool`) with one configurable channel width; the official HyperTransformer code
orders the block conv -> ReLU -> max-pool -> batch norm (`conv_relu_pool_bn`), which a CNN
takes with `block_order="conv-relu-pool-bn"` (`BLOCK_ORDERS`). On the CPU the block runs through
the hand-written kernels of `metalearn.cpu_ops`, elsewhere through XLA's own convolution and
pooling (`ops`, `resolve_ops`). Parameters are a plain pytree
`{"blocks": [{"w": [3, 3, C_in, C_out], "scale": [C_out], "shift": [C_out]}, ...]}` so that a
learner can generate (HyperTransformer) or adapt (MAML) any of them; a conv bias is left out
because batch norm's shift makes it redundant.

Batch norm never keeps running averages: it always normalises with *batch statistics*, as in
the HyperTransformer code, because a few-shot model meets new classes every episode. Which batch
supplies the statistics is the caller's choice: `cnn_forward(params, x)` computes them from `x`
and returns them, `cnn_apply(params, x, stats=...)` reuses given ones. The ProtoNet learner
computes them once on the support set (at adapt time) and reuses them for every query, so a
query's prediction never depends on the other queries in its batch (no transduction) and a
single query is not a special case.

The CNN, the dense models and the transformer blocks share this module (a little past the usual
size) because the learners combine them; the CPU kernels are apart, in `metalearn.cpu_ops`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metalearn.core import Array, PyTree

BN_EPS = 1e-5
# HyperTransformer channel widths; any positive width works.
CNN_WIDTHS = (4, 8, 16, 32, 64)


class BNStats(NamedTuple):
    """Per-channel batch statistics of one batch-norm layer."""

    mean: Array  # [C]
    var: Array  # [C]


def init_conv(key: Array, in_channels: int, out_channels: int, kernel_size: int = 3) -> Array:
    """He-normal conv kernel [k, k, C_in, C_out] (fan-in k*k*C_in, ReLU gain)."""
    fan_in = kernel_size * kernel_size * in_channels
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    return jax.random.normal(key, shape) * math.sqrt(2.0 / fan_in)


def init_cnn(key: Array, in_channels: int, widths: Sequence[int] = (64, 64, 64, 64),
             kernel_size: int = 3) -> PyTree:
    """Parameters of the conv-BN-ReLU-pool stack, one block per entry of `widths`."""
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of positive channel counts, "
                         f"got {widths}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    keys = jax.random.split(key, len(widths))
    blocks, c_in = [], in_channels
    for k, c_out in zip(keys, widths, strict=True):
        blocks.append({"w": init_conv(k, c_in, int(c_out), kernel_size),
                       "scale": jnp.ones((int(c_out),)), "shift": jnp.zeros((int(c_out),))})
        c_in = int(c_out)
    return {"blocks": blocks}


def conv_same(x: Array, w: Array) -> Array:
    """Stride-1 'same' convolution of NHWC images with an HWIO kernel: XLA's own."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _pool_windows(x: Array, size: int) -> list[Array]:
    """The size*size strided views [N, Ho, Wo, C] of the windows' positions (floor mode)."""
    n, h, w, c = x.shape
    ho, wo = h // size, w // size
    x6 = x[:, :ho * size, :wo * size].reshape(n, ho, size, wo, size, c)
    return [x6[:, :, i, :, j] for i in range(size) for j in range(size)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x: Array, size: int = 2) -> Array:
    """Non-overlapping `size` x `size` max-pooling of NHWC maps, floor mode (28->14->7->3->1).

    The VJP is written by hand: the forward pass records which position of each window holds
    its (first) maximum, and the gradient goes to that position alone, built in one pass that
    interleaves the windows back (no scatter, no stacked copy of the windows). Its gradient
    (of any order) is that mask times the incoming gradient. No equality test between the
    input and the maximum is made: XLA:CPU, recomputing the input in another fusion with other
    rounding, then dropped gradients under `jit` (seen with jax 0.10.2 on the CNN's first block
    with `jnp.max`'s gradient: jitted and eager gradients differed by 0.13 for values of 0.28).
    """
    return _max_pool_fwd(x, size)[0]


def _max_pool_fwd(x: Array, size: int) -> tuple[Array, tuple[Array, tuple[int, ...]]]:
    return _pool_select(x, size, lambda v, best: v > best)


def _pool_select(x: Array, size: int, better: Callable[[Array, Array], Array]
                 ) -> tuple[Array, tuple[Array, tuple[int, ...]]]:
    """Each window's first element that no later one is `better` than, and its position."""
    wins = _pool_windows(x, size)
    index = jnp.int8 if size * size <= 127 else jnp.int32
    best, where = wins[0], jnp.zeros(wins[0].shape, index)
    for i, v in enumerate(wins[1:], 1):
        take = better(v, best)
        best, where = jnp.where(take, v, best), jnp.where(take, index(i), where)
    return best, (where, x.shape)


def _max_pool_bwd(size: int, res: tuple[Array, tuple[int, ...]], g: Array) -> tuple[Array]:
    return (_pool_grad(size, res, g),)


def _pool_grad(size: int, res: tuple[Array, tuple[int, ...]], g: Array) -> Array:
    """The pooled gradient g put back at each window's recorded position (zero elsewhere),
    written in one pass as [N, Ho, i, Wo, j, C] and reshaped (no stack, no transpose)."""
    where, shape = res
    n, ho, wo, c = g.shape
    pos = (jnp.arange(size, dtype=where.dtype)[:, None] * size
           + jnp.arange(size, dtype=where.dtype)[None, :]).reshape(size, 1, size, 1)
    hit = where[:, :, None, :, None, :] == pos  # does window position (i, j) hold the max?
    dx = jnp.where(hit, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return jnp.pad(dx.reshape(n, ho * size, wo * size, c),
                   ((0, 0), (0, shape[1] - ho * size), (0, shape[2] - wo * size), (0, 0)))


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def batch_stats(x: Array) -> BNStats:
    """Per-channel mean and (biased) variance over every axis but the last."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return BNStats(mean, var)


def batch_norm(x: Array, scale: Array, shift: Array, stats: BNStats,
               eps: float = BN_EPS) -> Array:
    """gamma * (x - mu) / sqrt(sigma^2 + eps) + beta with the given statistics."""
    return (x - stats.mean) * (scale * jax.lax.rsqrt(stats.var + eps)) + shift


OPS = ("auto", "cpu", "xla", "patches")  # how the CNN block is computed (`resolve_ops`)
OPS_ENV = "METALEARN_OPS"


def resolve_ops(ops: str | None = None) -> str:
    """"cpu" (the hand-written kernels of `metalearn.cpu_ops`), "xla" (XLA's convolution and
    pooling) or "patches" (XLA's pooling, convolutions as patch products, `conv2d_patches`: for
    a kernel per example): `ops` itself, else $METALEARN_OPS, else by backend ("auto": the
    kernels on the CPU, where they were tuned, XLA's own elsewhere)."""
    choice = ops or os.environ.get(OPS_ENV) or "auto"
    if choice not in OPS:
        raise ValueError(f"ops={choice!r}: use one of {', '.join(OPS)} (or unset ${OPS_ENV})")
    if choice == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return choice


def conv2d(x: Array, w: Array, ops: str | None = None) -> Array:
    """Stride-1 'same' convolution of NHWC images with an odd HWIO kernel (`resolve_ops`)."""
    ops = resolve_ops(ops)
    if ops == "cpu":
        from metalearn import cpu_ops

        return cpu_ops.conv2d(x, w)
    return conv2d_patches(x, w) if ops == "patches" else conv_same(x, w)


def conv2d_patches(x: Array, w: Array, stride: int = 1) -> Array:
    """conv2d(x, w)[:, ::stride, ::stride] (a 'same'-padded convolution read every `stride`
    pixels) as one product of the patches [N, Ho, Wo, k*k*C_in] with the kernel: the outputs a
    stride skips are never computed, and a kernel per example (`vmap`) makes it a batched
    matrix product instead of a grouped convolution."""
    k, c_in = w.shape[0], w.shape[2]
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
    patches = jnp.concatenate(
        [xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
         for i in range(k) for j in range(k)], axis=-1)
    return patches @ w.reshape(k * k * c_in, w.shape[-1])


def conv_bn_relu_pool(x: Array, w: Array, scale: Array, shift: Array,
                      stats: BNStats | None = None, size: int = 2,
                      ops: str | None = None) -> tuple[Array, BNStats]:
    """max_pool(relu(batch_norm(conv2d(x, w)))), the CNN block, and the batch-norm statistics
    used (the batch's own unless given); on "cpu" ops the same function computed with the
    pooling first (`metalearn.cpu_ops.conv_bn_relu_pool`)."""
    if resolve_ops(ops) == "cpu":
        from metalearn import cpu_ops

        return cpu_ops.conv_bn_relu_pool(x, w, scale, shift, stats, size)
    y = conv2d(x, w, ops)
    stats = batch_stats(y) if stats is None else stats
    return max_pool(jax.nn.relu(batch_norm(y, scale, shift, stats)), size), stats


def conv_relu_pool_bn(x: Array, w: Array, scale: Array, shift: Array,
                      stats: BNStats | None = None, size: int = 2,
                      ops: str | None = None) -> tuple[Array, BNStats]:
    """batch_norm(max_pool(relu(conv2d(x, w)))), the official HyperTransformer's block order,
    and the batch-norm statistics used (those of the pooled activations, the batch's own
    unless given). Max-pooling commutes with ReLU, so the convolution is pooled first; on "cpu"
    ops through `metalearn.cpu_ops.conv_pool`, whose kernel gradient comes from the pooled
    gradient."""
    if resolve_ops(ops) == "cpu":
        from metalearn import cpu_ops

        # max-pooling in every channel: conv_pool pools by the sign of its third argument,
        # and keys its computed-once pooling by it, which a constant would let XLA fold away
        pooled = cpu_ops.conv_pool(x, w, jnp.abs(scale), size)
    else:
        pooled = max_pool(conv2d(x, w, ops), size)
    h = jax.nn.relu(pooled)
    stats = batch_stats(h) if stats is None else stats
    return batch_norm(h, scale, shift, stats), stats


BLOCK_ORDERS = {"conv-bn-relu-pool": conv_bn_relu_pool, "conv-relu-pool-bn": conv_relu_pool_bn}


def check_block_order(owner: str, order: str) -> None:
    """Refuse a block order other than those of `BLOCK_ORDERS`, naming the choices."""
    if order not in BLOCK_ORDERS:
        raise ValueError(f"{owner}.block_order={order!r}: use conv-bn-relu-pool (ours, batch "
                         "norm before the ReLU) or conv-relu-pool-bn (the official "
                         "HyperTransformer's, batch norm on the pooled activations)")


def cnn_block(x: Array, w: Array, scale: Array, shift: Array, stats: BNStats | None = None,
              ops: str | None = None, order: str = "conv-bn-relu-pool"
              ) -> tuple[Array, BNStats]:
    """One CNN block in the given order (`BLOCK_ORDERS`) and the statistics it used."""
    return BLOCK_ORDERS[order](x, w, scale, shift, stats, ops=ops)


def _check_images(params: PyTree, x: Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"the CNN takes images [N, H, W, C], got shape {x.shape}")
    c_in = params["blocks"][0]["w"].shape[2]
    if x.shape[-1] != c_in:
        raise ValueError(f"images have {x.shape[-1]} channels but the CNN's first conv expects "
                         f"{c_in} (shape {x.shape}); images must be NHWC")
    depth = len(params["blocks"])
    if min(x.shape[1:3]) < 2 ** depth:
        raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} are too small for {depth} 2x2 "
                         f"max-pools (at least {2 ** depth}x{2 ** depth} needed)")


def cnn_forward(params: PyTree, x: Array, stats: Sequence[BNStats] | None = None,
                ops: str | None = None, order: str = "conv-bn-relu-pool"
                ) -> tuple[Array, list[BNStats]]:
    """Flattened features [N, D] and the batch-norm statistics used (from `x` unless given);
    `ops` picks how the blocks are computed (`resolve_ops`), `order` their order
    (`BLOCK_ORDERS`)."""
    _check_images(params, x)
    blocks = params["blocks"]
    if stats is not None and len(stats) != len(blocks):
        raise ValueError(f"got batch-norm statistics for {len(stats)} layers, the CNN has "
                         f"{len(blocks)}")
    used: list[BNStats] = []
    h = x
    for i, blk in enumerate(blocks):
        h, s = cnn_block(h, blk["w"], blk["scale"], blk["shift"],
                         None if stats is None else stats[i], ops=ops, order=order)
        used.append(s)
    return h.reshape(h.shape[0], -1), used


def cnn_apply(params: PyTree, x: Array, stats: Sequence[BNStats] | None = None,
              ops: str | None = None) -> Array:
    """Flattened features [N, D] of images [N, H, W, C] (batch statistics of `x` unless given)."""
    return cnn_forward(params, x, stats, ops)[0]


def cnn_output_dim(params: PyTree, image_shape: Sequence[int]) -> int:
    """Length of the flattened feature vector for images of shape (H, W, C)."""
    out = jax.eval_shape(lambda p, x: cnn_apply(p, x), params,
                         jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    return int(out.shape[-1])


# ---------------------------------------------------------------- models


class Model:
    """A network as two pure functions over an explicit parameter pytree (the model contract).

    `init(key, example_x) -> params` and `apply(params, x, stats=None) -> (out, stats)`, where
    `stats` is whatever the forward pass computes from its batch (batch-norm statistics; None
    for models without batch norm): computed from `x` unless given, so that a learner can take
    them from the support set and reuse them for every query. Parameters are a dict whose last
    layer sits under "head" (so that a learner can adapt or generate the head alone). Models
    are frozen dataclasses: hashable and comparable by their settings.
    """

    def init(self, key: Array, example_x: Array) -> PyTree:
        """Parameters for inputs shaped like `example_x` [N, ...]."""
        raise NotImplementedError

    def apply(self, params: PyTree, x: Array, stats: PyTree = None) -> tuple[Array, PyTree]:
        """Outputs [N, out_dim] of inputs [N, ...] and the batch statistics used."""
        raise NotImplementedError


def init_dense(key: Array | None, d_in: int, d_out: int) -> dict:
    """Dense layer {"w": [d_in, d_out], "b": [d_out]}: Glorot-uniform kernel (zeros if key is
    None), zero bias."""
    if key is None:
        return {"w": jnp.zeros((d_in, d_out)), "b": jnp.zeros((d_out,))}
    lim = math.sqrt(6.0 / (d_in + d_out))
    return {"w": jax.random.uniform(key, (d_in, d_out), minval=-lim, maxval=lim),
            "b": jnp.zeros((d_out,))}


def dense(p: dict, x: Array) -> Array:
    """x W + b on inputs flattened to [N, d_in]."""
    return x.reshape(x.shape[0], -1) @ p["w"] + p["b"]


def _check_out_dim(name: str, out_dim: int) -> None:
    if out_dim < 1:
        raise ValueError(f"{name}.out_dim must be >= 1 (outputs: classes or target width), "
                         f"got {out_dim}")


@dataclasses.dataclass(frozen=True)
class Linear(Model):
    """x -> x W + b on flattened inputs; zero-initialised by default (W_0 = 0, b_0 = 0)."""

    out_dim: int = 1
    zero_init: bool = True

    def __post_init__(self) -> None:
        _check_out_dim("Linear", self.out_dim)

    def init(self, key: Array, example_x: Array) -> PyTree:
        """{"head": {"w": [d, out_dim], "b": [out_dim]}} with d the flattened input size."""
        d = int(math.prod(example_x.shape[1:]))
        return {"head": init_dense(None if self.zero_init else key, d, self.out_dim)}

    def apply(self, params: PyTree, x: Array, stats: PyTree = None) -> tuple[Array, None]:
        """[N, out_dim]; no batch statistics."""
        return dense(params["head"], x), None


@dataclasses.dataclass(frozen=True)
class MLP(Model):
    """Fully connected ReLU network on flattened inputs: hidden layers, then a linear head."""

    hidden: tuple[int, ...] = (40, 40)
    out_dim: int = 1

    def __post_init__(self) -> None:
        _check_out_dim("MLP", self.out_dim)
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"MLP.hidden must list positive layer widths, got {self.hidden}")

    def init(self, key: Array, example_x: Array) -> PyTree:
        """Glorot-uniform kernels, zero biases: {"layers": [...], "head": {...}}."""
        sizes = [int(math.prod(example_x.shape[1:])), *map(int, self.hidden)]
        keys = jax.random.split(key, len(sizes))
        layers = [init_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:],
                                                          strict=False)]
        return {"layers": layers, "head": init_dense(keys[-1], sizes[-1], self.out_dim)}

    def apply(self, params: PyTree, x: Array, stats: PyTree = None) -> tuple[Array, None]:
        """[N, out_dim]; no batch statistics."""
        h = x.reshape(x.shape[0], -1)
        for p in params["layers"]:
            h = jax.nn.relu(dense(p, h))
        return dense(params["head"], h), None


@dataclasses.dataclass(frozen=True)
class CNN(Model):
    """The 4-block few-shot CNN (conv-BN-ReLU-pool) with a dense head of `out_dim` outputs
    (`out_dim=0`: no head, the flattened features are the output, as ProtoNet embeds).
    `stats` are the per-block batch-norm statistics (`cnn_forward`); `ops` how the blocks are
    computed: "auto" (by backend), "cpu" (`metalearn.cpu_ops`) or "xla"; `block_order` the
    order of a block's operations (`BLOCK_ORDERS`)."""

    channels: int = 64
    num_blocks: int = 4
    out_dim: int = 0
    ops: str = "auto"
    block_order: str = "conv-bn-relu-pool"

    def __post_init__(self) -> None:
        if self.channels < 1 or self.num_blocks < 1 or self.out_dim < 0:
            raise ValueError(f"CNN needs channels >= 1, num_blocks >= 1 and out_dim >= 0, got "
                             f"channels={self.channels}, num_blocks={self.num_blocks}, "
                             f"out_dim={self.out_dim}")
        if self.ops not in OPS:
            raise ValueError(f"CNN ops={self.ops!r}: use one of {', '.join(OPS)}")
        check_block_order("CNN", self.block_order)

    def init(self, key: Array, example_x: Array) -> PyTree:
        """He-normal kernels, BN scale 1 / shift 0; Glorot-uniform head, zero bias."""
        if example_x.ndim != 4:
            raise ValueError(f"the CNN takes images [N, H, W, C], got shape {example_x.shape}")
        params = init_cnn(key, example_x.shape[-1], (self.channels,) * self.num_blocks)
        if self.out_dim:
            d = cnn_output_dim(params, example_x.shape[1:])
            params["head"] = init_dense(jax.random.fold_in(key, 1), d, self.out_dim)
        return params

    def apply(self, params: PyTree, x: Array,
              stats: Sequence[BNStats] | None = None) -> tuple[Array, list[BNStats]]:
        """Logits [N, out_dim] (features [N, D] without a head) and the BN statistics used."""
        feats, used = cnn_forward(params, x, stats, None if self.ops == "auto" else self.ops,
                                  self.block_order)
        return (dense(params["head"], feats) if "head" in params else feats), used


# ---------------------------------------------------------------- transformer


def layer_norm(x: Array, scale: Array, offset: Array, eps: float = 1e-6) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + offset over the last axis."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale + offset


def head_dims(width: int, fraction: float, heads: int) -> int:
    """fraction * width rounded up to a multiple of `heads` (query/key, value or inner size)."""
    return heads * math.ceil(fraction * width / heads)


def init_transformer(key: Array, width: int, num_layers: int, heads: int,
                     fraction: float = 1.0) -> list[dict]:
    """Encoder layers (attention + feed-forward, post-LayerNorm) for tokens of `width`; the
    query/key, value and inner feed-forward sizes are `fraction * width` (`head_dims`)."""
    d = head_dims(width, fraction, heads)
    layers = []
    for k in jax.random.split(key, num_layers):
        kq, kk, kv, ko, k1, k2 = jax.random.split(k, 6)
        layers.append({
            "query": init_dense(kq, width, d), "key": init_dense(kk, width, d),
            "value": init_dense(kv, width, d), "out": init_dense(ko, d, width),
            "ln1": {"scale": jnp.ones((width,)), "offset": jnp.zeros((width,))},
            "ff1": init_dense(k1, width, d), "ff2": init_dense(k2, d, width),
            "ln2": {"scale": jnp.ones((width,)), "offset": jnp.zeros((width,))}})
    return layers


def attention(p: dict, x: Array, heads: int, mask: Array | None = None) -> Array:
    """Multi-head softmax self-attention of tokens x [T, D]; `mask` [T, T] (True: may attend)."""
    t = x.shape[0]
    q, k, v = (dense(p[n], x).reshape(t, heads, -1) for n in ("query", "key", "value"))
    logits = jnp.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = jnp.where(mask[None], logits, -1e30)
    out = jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v).reshape(t, -1)
    return dense(p["out"], out)


def transformer_layer(p: dict, x: Array, heads: int, mask: Array | None = None) -> Array:
    """One post-LayerNorm encoder layer: LN(x + MHA(x)), then LN(h + FF(h)) with a ReLU FF."""
    h = layer_norm(x + attention(p, x, heads, mask), **p["ln1"])
    return layer_norm(h + dense(p["ff2"], jax.nn.relu(dense(p["ff1"], h))), **p["ln2"])


def transformer(layers: Sequence[dict], x: Array, heads: int,
                mask: Array | None = None) -> Array:
    """An encoder without positional encodings: permuting the tokens permutes the outputs."""
    for p in layers:
        x = transformer_layer(p, x, heads, mask)
    return x

"""Neural-network building blocks as pure functions of explicit parameter pytrees.

The few-shot CNN here is the one the few-shot literature (Vinyals et al. 2016, Snell et al.
2017, MAML) and the HyperTransformer paper use: four blocks of

    3x3 conv ('same', no bias) -> batch norm (learned scale and shift) -> ReLU -> 2x2 max-pool

with one configurable channel width. Parameters are a plain pytree
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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def _conv_same(x: Array, w: Array) -> Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv2d(x: Array, w: Array) -> Array:
    """Stride-1 'same' convolution of NHWC images with an odd HWIO kernel.

    The VJP is written by hand: inside `lax.scan` (how the outer loop runs its steps) XLA:CPU
    lowers JAX's automatic kernel gradient to a non-canonical convolution that runs about 20x
    slower; here dx is a plain convolution and dw one matrix product per kernel tap.
    """
    return _conv_same(x, w)


def _conv2d_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _conv_same(x, w), (x, w)


def _conv2d_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = res
    k = w.shape[0]
    p, (h, wd) = k // 2, x.shape[1:3]
    dx = _conv_same(g, jnp.flip(w, (0, 1)).swapaxes(2, 3))
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    dw = jnp.stack([jnp.stack([jnp.einsum("nhwc,nhwo->co", xp[:, i:i + h, j:j + wd], g)
                               for j in range(k)]) for i in range(k)])
    return dx, dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def max_pool(x: Array, size: int = 2) -> Array:
    """Non-overlapping `size` x `size` max-pooling of NHWC maps, floor mode (28->14->7->3->1)."""
    n, h, w, c = x.shape
    ho, wo = h // size, w // size
    x = x[:, :ho * size, :wo * size]
    # A reshape and max: its gradient is far cheaper on CPU than reduce_window's scatter.
    return jnp.max(x.reshape(n, ho, size, wo, size, c), axis=(2, 4))


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


def cnn_forward(params: PyTree, x: Array,
                stats: Sequence[BNStats] | None = None) -> tuple[Array, list[BNStats]]:
    """Flattened features [N, D] and the batch-norm statistics used (from `x` unless given)."""
    _check_images(params, x)
    blocks = params["blocks"]
    if stats is not None and len(stats) != len(blocks):
        raise ValueError(f"got batch-norm statistics for {len(stats)} layers, the CNN has "
                         f"{len(blocks)}")
    used: list[BNStats] = []
    h = x
    for i, blk in enumerate(blocks):
        h = conv2d(h, blk["w"])
        s = batch_stats(h) if stats is None else stats[i]
        used.append(s)
        h = max_pool(jax.nn.relu(batch_norm(h, blk["scale"], blk["shift"], s)))
    return h.reshape(h.shape[0], -1), used


def cnn_apply(params: PyTree, x: Array, stats: Sequence[BNStats] | None = None) -> Array:
    """Flattened features [N, D] of images [N, H, W, C] (batch statistics of `x` unless given)."""
    return cnn_forward(params, x, stats)[0]


def cnn_output_dim(params: PyTree, image_shape: Sequence[int]) -> int:
    """Length of the flattened feature vector for images of shape (H, W, C)."""
    out = jax.eval_shape(lambda p, x: cnn_apply(p, x), params,
                         jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
    return int(out.shape[-1])

"""Neural-network building blocks as pure functions of explicit parameter pytrees.

The few-shot CNN here is the one the few-shot literature (Vinyals et al. 2016, Snell et al.
2017, MAML) and the HyperTransformer paper use: four blocks of

    3x3 conv ('same', no bias) -> batch norm (learned scale and shift) -> ReLU -> 2x2 max-pool

(computed as one, pooling first: `conv_bn_relu_pool`) with one configurable channel
width. Parameters are a plain pytree
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

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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


# Inputs with at most this many multiply-adds per output (k * k * C_in) are convolved as a sum
# of shifted slices times kernel rows (`_conv_taps`) rather than by XLA's convolution; with at
# most `TAP_SUM_BUFFER_MAX_CHANNELS` output channels the sum is computed once into a buffer
# (`_computed_once`) rather than fused into each of its consumers.
TAP_SUM_MAX_TERMS = 27
TAP_SUM_BUFFER_MAX_CHANNELS = 8


def _pad_hw(x: Array, p: int) -> Array:
    """NHWC maps zero-padded by p pixels on each side of H and W."""
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


def _conv_taps(x: Array, w: Array) -> Array:
    """'same' convolution as sum_{i,j,c} x_pad[:, i:i+H, j:j+W, c, None] * w[i, j, c]: one
    elementwise fusion, for few input channels (`TAP_SUM_MAX_TERMS`)."""
    k, h, wd = w.shape[0], x.shape[1], x.shape[2]
    p = k // 2
    xp = _pad_hw(x, p)
    out = jnp.zeros((*x.shape[:3], w.shape[-1]), jnp.result_type(x, w))
    for i in range(k):
        for j in range(k):
            for c in range(x.shape[-1]):
                out = out + xp[:, i:i + h, j:j + wd, c:c + 1] * w[i, j, c]
    return out


def _computed_once(f: Callable[..., Any], key: Array, *args: Array) -> Any:
    """f(*args) written to its own buffers: XLA:CPU fused the tap sum into its consumers
    (batch-norm statistics, normalisation, a scan's stacked residuals: 163 + 142 ms of the
    HyperTransformer's step) and an `optimization_barrier` did not stop it (the same single
    fusion in the compiled HLO, the same step time), but it does not fuse across a
    conditional, so f sits in both branches of one whose predicate, isnan(key[0]), is only
    unknown at compile time (both branches are the same). `key` is a parameter (a kernel, a
    batch-norm scale): under `vmap` with one per example the conditional becomes a select and
    f is fused again, as without it."""
    return jax.lax.cond(jnp.isnan(key.ravel()[0]), f, f, *args)


def _conv(x: Array, w: Array) -> Array:
    """The 'same' convolution of the forward pass and of the input gradient: XLA's, or the tap sum
    for few input channels. On this 2-core CPU (8 episodes of 300 images, vmapped) the tap sum
    takes 9 vs 64 ms for 28x28x1 -> 8 channels, 37 vs 85 ms -> 64, 17 vs 76 ms for 3 -> 8
    channels and 5 vs 19 ms for 14x14x4 -> 8; at 8 input channels XLA's is as fast or faster (15
    vs 16 ms at 14x14 -> 8, 106 vs 74 ms -> 64). 27 terms (3 channels, 3x3: grayscale and RGB
    images) is the limit because each term is an operation to compile: with 36 (a 4-channel
    CNN's hidden layers too) jit of a second-order MAML meta-gradient on a 2-block 4-channel CNN
    took 48 s against 15 s with XLA's convolutions and 20 s with 27. In the ProtoNet meta-step
    (interleaved A/B in one process) the first block's tap sum, fused into its consumers, takes
    the step from 5.5 to 3.9-4.2 s at 64 channels, 1.72 to 1.31 s at 32 and 532 to 446 ms at 16
    (into a buffer: 5.1, 1.50 and 0.47 s); at 8 channels only the buffered sum gains (409 -> 317
    and 369 -> 288 ms; fused 410 and 387 ms), as in the HyperTransformer's (638 -> 556 ms; fused
    819 ms) and first-order MAML's steps."""
    if w.shape[0] * w.shape[1] * x.shape[-1] > TAP_SUM_MAX_TERMS:
        return _conv_same(x, w)
    if w.shape[-1] <= TAP_SUM_BUFFER_MAX_CHANNELS:
        return _computed_once(_conv_taps, w, x, w)
    return _conv_taps(x, w)


@jax.custom_vjp
def conv2d(x: Array, w: Array) -> Array:
    """Stride-1 'same' convolution of NHWC images with an odd HWIO kernel.

    The forward pass and dx go through `_conv` (a tap sum for few input channels, else XLA's
    convolution). The VJP is written by hand (`_conv2d_bwd`): dx is a plain convolution, and dw
    products of row-shifted slices of the padded input with the output gradient
    (`_kernel_grad`). JAX's automatic kernel gradient is a convolution with the batch as
    features that XLA:CPU runs far slower inside `lax.scan` (8 episodes of [320, 14, 14, 8]:
    0.67 s vmapped, 2.4 s as one batch, against 63 and 81 ms with one product per tap), and
    per-tap slices of the 4-D input cost more than the products themselves.
    """
    return _conv(x, w)


def _conv2d_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return _conv(x, w), (x, w)


def _kernel_grad(x: Array, g: Array, k: int) -> Array:
    """dL/dw [k, k, C_in, C_out] of a 'same' k x k convolution with input x and output
    gradient g (both NHWC).

    Padded by p = k // 2 and flattened to rows [R, C], an output pixel's row r reads, for tap
    (i, j), the input row r + (i - p) L + (j - p), where L = W + 2p is a padded image row. With
    g zero at the padding, dw[i, j] = sum_r x[r + offset]^T g[r] over the rows: a contiguous
    slice and a matrix product per tap. Two schedules of those products, measured on this
    2-core CPU (20-way 1-shot 15-query, 8 episodes vmapped):

    - few rows (a patch matrix [R, k*k*C_in] of at most 2**21 entries, e.g. MAML's inner
      steps on a support set): one product per tap over all rows (`lax.map`); second-order
      MAML's 8-channel meta-step took 1.72 s this way against 2.38 s with the row chunks of
      an earlier version.
    - many rows: a few whole images at a time (`_kernel_grad_images`), padded and flattened
      inside the loop, so that no padded copy of g (the largest array of the backward pass) is
      written and the patches stay in cache. For 8 episodes of 300 images this takes 28, 31, 9
      and 4 ms for the four 8-channel blocks' kernel gradients (28x28x1, 14x14x8, 7x7x8 and
      3x3x8 inputs) against 49, 45, 10 and 5 ms with chunks of rows of the whole padded
      batch (four padded copies of x and g), and 93 and 488 ms against 267 and 716 ms for the
      64-channel first and second blocks. (Merging the episodes into one batch was slower:
      40, 38 and 12 ms for the first three 8-channel blocks; so was XLA's convolution for the
      kernel gradient, 95 ms for the first block, though 33, 7 and 1 ms for the other three.)
    """
    p = k // 2
    c_in, c_out = x.shape[-1], g.shape[-1]
    per_image = (x.shape[1] + 2 * p) * (x.shape[2] + 2 * p)
    rows = _kernel_grad_rows(c_in, c_out, x.shape[0] * per_image, k)
    if rows is not None:
        dw = _sum_over_chunks(functools.partial(_kernel_grad_images, k=k), rows // per_image,
                              x, g)
        return dw.reshape(k, k, c_in, c_out)
    xf = _pad_hw(x, p).reshape(-1, c_in)
    gf = _pad_hw(g, p).reshape(-1, c_out)
    lo = p * (x.shape[2] + 2 * p) + p  # the largest tap offset, in rows
    n = xf.shape[0] - 2 * lo
    gs = gf[lo:lo + n]
    dw = jax.lax.map(lambda o: jax.lax.dynamic_slice_in_dim(xf, lo + o, n).T @ gs,
                     jnp.array(_tap_offsets(x.shape[2], k)))
    return dw.reshape(k, k, c_in, c_out)


def _sum_over_chunks(f: Callable[..., Array], m: int, *arrays: Array) -> Array:
    """sum_b f(*[a[b*m:(b+1)*m] for a in arrays]) over chunks of m (at least 1) images, the
    last chunk possibly shorter: a `fori_loop` over the whole chunks, then the tail."""
    n = arrays[0].shape[0]
    m = max(1, min(n, m))
    whole, tail = divmod(n, m)
    if whole == 1 and not tail:
        return f(*arrays)
    first = jax.eval_shape(f, *(a[:m] for a in arrays))

    def add_chunk(b: Array, acc: Array) -> Array:
        return acc + f(*(jax.lax.dynamic_slice_in_dim(a, b * m, m) for a in arrays))

    acc = jax.lax.fori_loop(0, whole, add_chunk, jnp.zeros(first.shape, first.dtype))
    return acc + f(*(a[whole * m:] for a in arrays)) if tail else acc


def _tap_offsets(width: int, k: int) -> list[int]:
    """Row offsets (i - p) L + (j - p) of the k*k taps in images padded by p = k // 2 and
    flattened, whose padded rows are L = width + 2p pixels long."""
    p = k // 2
    return [(i - p) * (width + 2 * p) + (j - p) for i in range(k) for j in range(k)]


def _kernel_grad_images(x: Array, g: Array, k: int) -> Array:
    """sum_r patches(x)[r]^T g[r] [k*k*C_in, C_out] over m whole images: x and g padded and
    flattened, x transposed to [C_in, rows] with a zero halo, its k*k row-shifted slices
    stacked as a [k*k*C_in, rows] patch matrix (tap-major) and one product with g's rows (taps
    of a pixel never leave its padded image; those of the padding read the halo, times zero)."""
    p = k // 2
    offsets = _tap_offsets(x.shape[2], k)
    lo = max(offsets)
    gf = _pad_hw(g, p).reshape(-1, g.shape[-1])
    n = gf.shape[0]
    xt = jnp.pad(_pad_hw(x, p).reshape(n, x.shape[-1]).T, ((0, 0), (lo, lo)))
    return jnp.concatenate([xt[:, lo + o:lo + o + n] for o in offsets], axis=0) @ gf


def _kernel_grad_rows(c_in: int, c_out: int, total: int, k: int) -> int | None:
    """Padded image rows per chunk of `_kernel_grad`: 32768 / C_in and at most 2**19 / C_out
    (so that the chunk of g stays in cache), within 1024 and 16384 (measured best at 1 -> 8,
    1 -> 64, 8 -> 8 and 64 -> 64 channels); or None for one product per tap when the `total`
    rows' patch matrix has at most 2**21 entries."""
    if total * k * k * c_in <= 2**21:
        return None
    return min(16384, max(1024, min(32768 // c_in, 2**19 // c_out)))


def _input_grad(g: Array, w: Array) -> Array:
    """dL/dx of a 'same' convolution: g convolved with the flipped, transposed kernel."""
    with jax.named_scope("conv_input_grad"):
        return _conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3))


def _conv2d_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, w = res
    dx = _input_grad(g, w)
    with jax.named_scope("conv_kernel_grad"):
        dw = _kernel_grad(x, g, w.shape[0]).astype(w.dtype)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_pool(x: Array, w: Array, scale: Array, size: int = 2) -> Array:
    """`conv2d(x, w)` pooled in size x size windows: maxima in the channels where `scale` [C_out]
    is >= 0, minima where it is negative (the pooling that commutes with a batch norm of that
    scale and a ReLU: `conv_bn_relu_pool`). No gradient goes to `scale`.

    The backward pass takes the kernel gradient from the pooled gradient and the recorded
    positions (`_pooled_kernel_grad`) rather than from the full-resolution gradient, which is
    only built (once, `_computed_once`) for the input gradient: a network's first block never
    builds it. The pooling and that gradient are each computed once: fused into their
    consumers (the next block's convolution, its kernel gradient, batch norm's reductions),
    XLA:CPU recomputed them in each, and an 8-channel ProtoNet step took 336 against 203 ms.
    """
    return _conv_pool_fwd(x, w, scale, size)[0]


def _conv_pool_fwd(x: Array, w: Array, scale: Array, size: int
                   ) -> tuple[Array, tuple[Array, Array, Array, Array]]:
    best, where = _signed_pool_once(_conv(x, w), scale, size)
    return best, (x, w, where, scale)


def _signed_pool_once(y: Array, scale: Array, size: int) -> tuple[Array, Array]:
    """Window maxima of y where scale >= 0, minima where negative, and their positions,
    `_computed_once`."""
    def pool(y: Array, scale: Array) -> tuple[Array, Array]:
        negative = scale < 0
        best, (where, _) = _pool_select(y, size, lambda v, b: jnp.where(negative, v < b, v > b))
        return best, where

    return _computed_once(pool, scale, y, scale)


def _unpool_once(size: int, where: Array, shape: tuple[int, ...], scale: Array,
                 gp: Array) -> Array:
    """`_pool_grad`, `_computed_once` (keyed by the batch-norm scale)."""
    return _computed_once(lambda where, gp: _pool_grad(size, (where, shape), gp), scale, where,
                          gp)


def _conv_pool_bwd(size: int, res: tuple[Array, Array, Array, Array], gp: Array
                   ) -> tuple[Array, Array, Array]:
    x, w, where, scale = res
    with jax.named_scope("conv_kernel_grad"):
        dw = _pooled_kernel_grad(x, gp, where, w.shape[0], size).astype(w.dtype)
    with jax.named_scope("conv_input_grad"):
        g = _unpool_once(size, where, (*x.shape[:-1], w.shape[-1]), scale, gp)
    dx = _input_grad(g, w)
    return dx, dw, jnp.zeros_like(scale)


conv_pool.defvjp(_conv_pool_fwd, _conv_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _signed_pool(y: Array, scale: Array, size: int) -> Array:
    """The pooling of `conv_pool` alone, for a map already computed (forward and backward each
    `_computed_once`; no gradient to `scale`)."""
    return _signed_pool_fwd(y, scale, size)[0]


def _signed_pool_fwd(y: Array, scale: Array, size: int
                     ) -> tuple[Array, tuple[Array, tuple[int, ...], Array]]:
    best, where = _signed_pool_once(y, scale, size)
    return best, (where, y.shape, scale)


def _signed_pool_bwd(size: int, res: tuple[Array, tuple[int, ...], Array], gp: Array
                     ) -> tuple[Array, Array]:
    where, shape, scale = res
    return _unpool_once(size, where, shape, scale, gp), jnp.zeros_like(scale)


_signed_pool.defvjp(_signed_pool_fwd, _signed_pool_bwd)


def _pooled_kernel_grad(x: Array, gp: Array, where: Array, k: int, size: int) -> Array:
    """dL/dw [k, k, C_in, C_out] of a 'same' k x k convolution followed by size x size pooling,
    from the input x [N, H, W, C_in], the pooled gradient gp [N, Ho, Wo, C_out] and the
    position in its window (0 .. size^2 - 1) that each pooled value came from.

    The output pixel at offset (a, b) of window (ho, wo) reads, for tap (i, j), the padded
    input at (size ho + a + i, size wo + b + j): every window's taps lie in its
    (size + k - 1)^2 neighbourhood. So dw[i, j] = sum_{a, b} Z[a + i, b + j, a, b] with
    Z = P^T G, P [pixels, (size + k - 1)^2 C_in] the neighbourhoods (strided slices) and
    G [pixels, size^2 C_out] the pooled gradient put at its window position: one product
    over the pooled pixels, a quarter of the full resolution, a few whole images at a time
    (`_sum_over_chunks`). For 8 episodes of 300 images at 8 channels the four blocks take 18,
    22, 4 and 1 ms against 51, 35, 9 and 4 ms for the full-resolution gradient and
    `_kernel_grad` (71 and 311 ms against 145 and 445 ms for the first two 64-channel blocks).
    """
    c_in, c_out = x.shape[-1], gp.shape[-1]
    ho, wo, span = gp.shape[1], gp.shape[2], size + k - 1
    rows = _pooled_kernel_grad_rows(c_in, c_out)

    def chunk(x: Array, gp: Array, where: Array) -> Array:
        p = k // 2
        xp = jnp.pad(x, ((0, 0), (p, max(p, size * ho + span - 1 - x.shape[1] - p)),
                         (p, max(p, size * wo + span - 1 - x.shape[2] - p)), (0, 0)))
        hood = jnp.concatenate([xp[:, u:u + size * ho:size, v:v + size * wo:size]
                                for u in range(span) for v in range(span)], axis=-1)
        placed = jnp.concatenate([jnp.where(where == q, gp, jnp.zeros((), gp.dtype))
                                  for q in range(size * size)], axis=-1)
        return hood.reshape(-1, span * span * c_in).T @ placed.reshape(-1, size * size * c_out)

    z = _sum_over_chunks(chunk, rows // (ho * wo), x, gp, where)
    z = z.reshape(span, span, c_in, size, size, c_out)
    return sum(z[a:a + k, b:b + k, :, a, b] for a in range(size) for b in range(size))


def _pooled_kernel_grad_rows(c_in: int, c_out: int) -> int:
    """Pooled pixels per chunk of `_pooled_kernel_grad`: at most 4096, 2**14 / C_in and
    2**17 / C_out (measured best at 1 -> 8, 8 -> 8, 1 -> 64 and 64 -> 64 channels)."""
    return min(4096, 2**14 // c_in, 2**17 // c_out)


def conv_bn_relu_pool(x: Array, w: Array, scale: Array, shift: Array,
                      stats: BNStats | None = None, size: int = 2) -> tuple[Array, BNStats]:
    """max_pool(relu(batch_norm(conv2d(x, w)))), the CNN block, computed with the pooling first,
    and the batch-norm statistics used (the batch's own unless given).

    Batch norm is a per-channel map a (z - mu) + beta with a = gamma / sqrt(sigma^2 + eps), and
    ReLU is non-decreasing, so max-pooling commutes with both where a >= 0 and becomes
    min-pooling where a < 0: out = relu(batch_norm(pool(conv2d(x, w)))). The values are the
    same (up to the rounding of the normalisation, e.g. a fused multiply-add), and so are the
    gradients up to which element of a tied window takes them; but the normalisation, ReLU and
    their backward pass (reductions for gamma, beta and the statistics included) touch a
    quarter of the elements, and the convolution's output is read once forward. In the
    ProtoNet meta-step at 8 channels (interleaved A/B in one process) pooling first took the
    step from 252 to 198 ms and XLA's temporaries from 288 to 122 MB.

    With `stats` given (a support set's, used for queries) the block is `conv_pool`, whose
    kernel gradient comes from the pooled gradient (209 -> 177 -> 148 ms for that ProtoNet
    step: unpooled, pooled first, `conv_pool`). Without, the statistics need the convolution's
    whole output and its gradient anyway, so it is computed once (`conv2d`) and pooled apart
    (`_signed_pool`): computing it twice instead, for the statistics and inside `conv_pool`,
    made second-order MAML, whose inner loop takes every block's statistics, 1.91 against
    1.28 s a step and ProtoNet 147 against 140 ms.
    """
    if stats is None:
        with jax.named_scope("conv_pool"):  # named scopes: the profile's categories
            y = conv2d(x, w)
            pooled = _signed_pool(y, scale, size)
        with jax.named_scope("batch_stats"):
            stats = batch_stats(y)
    else:
        with jax.named_scope("conv_pool"):
            pooled = conv_pool(x, w, scale, size)
    with jax.named_scope("bn_relu"):
        return jax.nn.relu(batch_norm(pooled, scale, shift, stats)), stats


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
        h, s = conv_bn_relu_pool(h, blk["w"], blk["scale"], blk["shift"],
                                 None if stats is None else stats[i])
        used.append(s)
    return h.reshape(h.shape[0], -1), used


def cnn_apply(params: PyTree, x: Array, stats: Sequence[BNStats] | None = None) -> Array:
    """Flattened features [N, D] of images [N, H, W, C] (batch statistics of `x` unless given)."""
    return cnn_forward(params, x, stats)[0]


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
    `stats` are the per-block batch-norm statistics (`cnn_forward`)."""

    channels: int = 64
    num_blocks: int = 4
    out_dim: int = 0

    def __post_init__(self) -> None:
        if self.channels < 1 or self.num_blocks < 1 or self.out_dim < 0:
            raise ValueError(f"CNN needs channels >= 1, num_blocks >= 1 and out_dim >= 0, got "
                             f"channels={self.channels}, num_blocks={self.num_blocks}, "
                             f"out_dim={self.out_dim}")

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
        feats, used = cnn_forward(params, x, stats)
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

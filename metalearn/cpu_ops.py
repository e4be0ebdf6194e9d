"""Hand-written XLA:CPU kernels for the few-shot CNN's block (conv -> BN -> ReLU -> pool).

`metalearn.nn` runs its CNN block through these on the CPU backend (`ops="cpu"`, the default
there) and through XLA's own convolution and pooling elsewhere (`ops="xla"`); both compute the
same function and gradients (`tests/test_nn.py`). What the kernels do differently, and why:

- `conv2d`: the convolution of inputs with few channels as a sum of shifted slices (the tap
  sum), and a kernel gradient as matrix products of row-shifted slices instead of XLA:CPU's
  slow batch-as-feature convolution;
- `conv_bn_relu_pool`: the block pooled first (pooling commutes with batch norm and ReLU,
  given the sign of the scale), so that normalisation and ReLU touch a quarter of the
  elements; with given statistics, `conv_pool` takes the kernel gradient from the pooled
  gradient;
- `_computed_once`: producers XLA:CPU would recompute inside each consumer are written once.

These choices were measured on a 2-core CPU; `python benchmarks/protonet.py` prints the step
times with these kernels and with XLA's plain convolution (`--ops xla`), `benchmarks/
profile_step.py` where the time goes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metalearn.core import Array
from metalearn.nn import (
    BNStats,
    _pool_grad,
    _pool_select,
    batch_norm,
    batch_stats,
    conv_same,
)

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
    """f(*args) written to its own buffers. XLA:CPU fuses a cheap producer (the tap sum, a
    pooling) into each of its consumers and recomputes it there, and an `optimization_barrier`
    does not stop it; it does not fuse across a conditional, so f sits in both branches of one
    whose predicate, isnan(key[0]), is unknown at compile time (both branches are the same).
    `key` is a parameter (a kernel, a batch-norm scale): under `vmap` with one per example the
    conditional becomes a select and f is fused again, as without it."""
    return jax.lax.cond(jnp.isnan(key.ravel()[0]), f, f, *args)


def _conv(x: Array, w: Array) -> Array:
    """The 'same' convolution of the forward pass and of the input gradient: XLA's, or the
    tap sum for inputs of at most TAP_SUM_MAX_TERMS multiply-adds per output (grayscale and RGB
    first blocks), where XLA:CPU's convolution is several times slower; with few output
    channels the sum goes into its own buffer. The limit stays at 27 because each term is an
    operation to compile (second-order MAML compiles far longer with more).
    `benchmarks/protonet.py` measures the step either way."""
    if w.shape[0] * w.shape[1] * x.shape[-1] > TAP_SUM_MAX_TERMS:
        return conv_same(x, w)
    if w.shape[-1] <= TAP_SUM_BUFFER_MAX_CHANNELS:
        return _computed_once(_conv_taps, w, x, w)
    return _conv_taps(x, w)


@jax.custom_vjp
def conv2d(x: Array, w: Array) -> Array:
    """Stride-1 'same' convolution of NHWC images with an odd HWIO kernel.

    The forward pass and dx go through `_conv` (a tap sum for few input channels, else XLA's
    convolution). The VJP is written by hand (`_conv2d_bwd`): dx is a plain convolution, and dw
    products of row-shifted slices of the padded input with the output gradient
    (`_kernel_grad`): JAX's automatic kernel gradient is a convolution with the batch as
    features, which XLA:CPU runs several times slower inside `lax.scan`.
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
    slice and a matrix product per tap. Two schedules of those products:

    - few rows (a patch matrix [R, k*k*C_in] of at most 2**21 entries, e.g. MAML's inner
      steps on a support set): one product per tap over all rows (`lax.map`);
    - many rows: a few whole images at a time (`_kernel_grad_images`), padded and flattened
      inside the loop, so that no padded copy of g (the largest array of the backward pass) is
      written and the patches stay in cache.
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
    (so that the chunk of g stays in cache), within 1024 and 16384 (the best of those tried at
    1 -> 8, 1 -> 64, 8 -> 8 and 64 -> 64 channels); or None for one product per tap when the
    `total` rows' patch matrix has at most 2**21 entries."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv_pool(x: Array, w: Array, scale: Array, size: int = 2) -> Array:
    """`conv2d(x, w)` pooled in size x size windows: maxima in the channels where `scale` [C_out]
    is >= 0, minima where it is negative (the pooling that commutes with a batch norm of that
    scale and a ReLU: `conv_bn_relu_pool`). No gradient goes to `scale`.

    The backward pass takes the kernel gradient from the pooled gradient and the recorded
    positions (`_pooled_kernel_grad`) rather than from the full-resolution gradient, which is
    only built (once, `_computed_once`) for the input gradient: a network's first block never
    builds it. The pooling and that gradient are each computed once, since XLA:CPU would
    otherwise recompute them in each of their consumers.
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
    (`_sum_over_chunks`).
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
    2**17 / C_out (the best of those tried at 1 -> 8, 8 -> 8, 1 -> 64 and 64 -> 64
    channels)."""
    return min(4096, 2**14 // c_in, 2**17 // c_out)


def conv_bn_relu_pool(x: Array, w: Array, scale: Array, shift: Array,
                      stats: BNStats | None = None, size: int = 2) -> tuple[Array, BNStats]:
    """max_pool(relu(batch_norm(conv2d(x, w)))), the CNN block, computed with the pooling first,
    and the batch-norm statistics used (the batch's own unless given).

    Batch norm is a per-channel map a (z - mu) + beta with a = gamma / sqrt(sigma^2 + eps), and
    ReLU is non-decreasing, so max-pooling commutes with both where a >= 0 and becomes
    min-pooling where a < 0: out = relu(batch_norm(pool(conv2d(x, w)))). The values are the
    same (up to the rounding of the normalisation), and so are the gradients up to which
    element of a tied window takes them; but the normalisation, ReLU and their backward pass
    touch a quarter of the elements, and the convolution's output is read once forward.

    With `stats` given (a support set's, used for queries) the block is `conv_pool`, whose
    kernel gradient comes from the pooled gradient. Without, the statistics need the
    convolution's whole output and its gradient anyway, so it is computed once (`conv2d`) and
    pooled apart (`_signed_pool`) rather than twice.
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

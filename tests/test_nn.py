"""The few-shot CNN: shapes, batch-norm statistics, the hand-written conv VJP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn import cpu_ops, nn


def _images(n: int = 6, size: int = 28, channels: int = 1, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, channels))


@pytest.mark.parametrize("width", nn.CNN_WIDTHS)
def test_cnn_shapes_for_every_width(width):
    params = nn.init_cnn(jax.random.PRNGKey(0), 1, (width,) * 4)
    assert [b["w"].shape for b in params["blocks"]] == \
        [(3, 3, 1, width)] + [(3, 3, width, width)] * 3
    out = jax.eval_shape(nn.cnn_apply, params, jax.ShapeDtypeStruct((6, 28, 28, 1), jnp.float32))
    assert out.shape == (6, width)  # 28 -> 14 -> 7 -> 3 -> 1
    assert nn.cnn_output_dim(params, (28, 28, 1)) == width
    assert nn.cnn_output_dim(params, (84, 84, 1)) == width * 25  # 84 -> 42 -> 21 -> 10 -> 5


def test_cnn_matches_a_direct_numpy_forward():
    params = nn.init_cnn(jax.random.PRNGKey(1), 2, (3, 4))
    params["blocks"][0]["scale"] = jnp.asarray([0.5, 2.0, 1.0])
    params["blocks"][1]["shift"] = jnp.asarray([0.1, -0.2, 0.3, 0.0])
    x = np.asarray(_images(4, 9, 2))

    def conv(h, w):
        k = w.shape[0] // 2
        hp = np.pad(h, ((0, 0), (k, k), (k, k), (0, 0)))
        out = np.zeros(h.shape[:3] + (w.shape[-1],))
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                out += hp[:, i:i + h.shape[1], j:j + h.shape[2]] @ w[i, j]
        return out

    h = x.astype(np.float64)
    for b in params["blocks"]:
        h = conv(h, np.asarray(b["w"], np.float64))
        mu, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        h = (h - mu) / np.sqrt(var + nn.BN_EPS) * np.asarray(b["scale"]) + np.asarray(b["shift"])
        h = np.maximum(h, 0)
        n, hh, ww, c = h.shape
        h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max((2, 4))
    np.testing.assert_allclose(jax.jit(nn.cnn_apply)(params, jnp.asarray(x)), h.reshape(4, -1),
                               rtol=1e-4, atol=1e-4)


def test_given_statistics_make_each_image_independent_of_its_batch():
    params = nn.init_cnn(jax.random.PRNGKey(0), 1, (4,) * 4)
    support, queries = _images(5, seed=1), _images(7, seed=2)
    _, stats = jax.jit(nn.cnn_forward)(params, support)
    apply = jax.jit(nn.cnn_apply)
    together = apply(params, queries, stats)
    alone = jax.vmap(lambda q: apply(params, q[None], stats)[0])(queries)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    # without given statistics the batch normalises itself: the support's own stats
    np.testing.assert_allclose(apply(params, support), apply(params, support, stats),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,k", [((3, 9, 9, 4), 3), ((2, 6, 11, 1), 3), ((2, 8, 7, 3), 5)])
def test_conv_vjp_matches_autodiff_of_lax_conv(shape, k):
    """The hand-written VJP (dw from row-shifted slices of the padded input) is JAX's own, for
    non-square images, one input channel and a 5x5 kernel too."""
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    w = jax.random.normal(jax.random.PRNGKey(3), (k, k, shape[-1], 5))
    g = jax.random.normal(jax.random.PRNGKey(4), (*shape[:3], 5))
    _, vjp = jax.vjp(cpu_ops.conv2d, x, w)
    _, vjp_ref = jax.vjp(nn.conv_same, x, w)
    for a, b in zip(vjp(g), vjp_ref(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# three channels and the 5x5 kernel (compiling-heavy) in the slow run
@pytest.mark.parametrize("shape,k", [((2, 6, 11, 1), 3),
                                     pytest.param((3, 7, 5, 3), 3, marks=pytest.mark.slow),
                                     pytest.param((2, 8, 7, 1), 5, marks=pytest.mark.slow)])
def test_tap_sum_convolution_is_xlas(shape, k):
    """The tap sum that convolves inputs of few channels is XLA's convolution, for non-square
    images, 3 channels and a 5x5 kernel, and vmapped over episodes; `_conv` routes to it."""
    x = jax.random.normal(jax.random.PRNGKey(2), (2, *shape))
    w = jax.random.normal(jax.random.PRNGKey(3), (k, k, shape[-1], 6))
    ref = jax.vmap(nn.conv_same, in_axes=(0, None))(x, w)
    # fused into consumers, and into its own buffer
    for conv in (cpu_ops._conv_taps, cpu_ops._conv):
        np.testing.assert_allclose(jax.vmap(conv, in_axes=(0, None))(x, w), ref,
                                   rtol=1e-5, atol=1e-5)
    w_each = jnp.stack([w, -w])  # a kernel per episode (MAML, the HyperTransformer)
    np.testing.assert_allclose(jax.vmap(cpu_ops._conv)(x, w_each),
                               jax.vmap(nn.conv_same)(x, w_each), rtol=1e-5, atol=1e-5)
    assert k * k * shape[-1] <= cpu_ops.TAP_SUM_MAX_TERMS
    jaxpr = str(jax.make_jaxpr(cpu_ops._conv)(x[0], w))  # 6 output channels: into a buffer
    assert "conv_general_dilated" not in jaxpr and "cond" in jaxpr
    many_out = jnp.zeros((k, k, shape[-1], cpu_ops.TAP_SUM_BUFFER_MAX_CHANNELS + 1))
    assert "cond" not in str(jax.make_jaxpr(cpu_ops._conv)(x[0], many_out))
    wide = jnp.zeros((3, 3, 8, 2))
    assert "conv_general_dilated" in str(jax.make_jaxpr(cpu_ops._conv)(jnp.zeros((1, 5, 5, 8)),
                                                                         wide))


@pytest.mark.parametrize("shape,stride", [((3, 9, 9, 4), 1), ((2, 9, 9, 4), 2),
                                          ((2, 6, 11, 1), 2), ((2, 7, 4, 3), 3)])
def test_patch_product_convolution_is_xlas_read_every_stride_pixels(shape, stride):
    """`conv2d_patches` is XLA's 'same' convolution subsampled by the stride (odd and even
    sizes), in value and in both gradients, and vmapped with a kernel per example it is the
    convolution of each example with its own kernel."""
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    w = jax.random.normal(jax.random.PRNGKey(3), (3, 3, shape[-1], 5))

    def ref(x, w):
        return nn.conv_same(x, w)[:, ::stride, ::stride]

    out = nn.conv2d_patches(x, w, stride)
    np.testing.assert_allclose(out, ref(x, w), rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.PRNGKey(4), out.shape)
    for a, b in zip(jax.vjp(lambda x, w: nn.conv2d_patches(x, w, stride), x, w)[1](g),
                    jax.vjp(ref, x, w)[1](g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    w_each = jnp.stack([w, -2 * w, w[::-1]])
    x_each = jnp.stack([x, x[::-1], 2 * x])
    np.testing.assert_allclose(
        jax.vmap(lambda x, w: nn.conv2d_patches(x, w, stride))(x_each, w_each),
        jnp.stack([ref(a, b) for a, b in zip(x_each, w_each, strict=True)]),
        rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [7, 264, 1000, None])
def test_kernel_gradient_adds_up_chunks_and_a_ragged_tail(monkeypatch, rows):
    """dw taken a few whole images at a time (one image per chunk with 7 rows; two with 264
    rows of 11 x 12 padded images, then a tail of one; all 5 at once with 1000) or one product
    per tap over all rows (None) is JAX's own kernel gradient, also vmapped over episodes."""
    monkeypatch.setattr(cpu_ops, "_kernel_grad_rows", lambda c_in, c_out, total, k: rows)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 5, 9, 10, 3))
    w = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 3, 4))
    g = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 9, 10, 4))

    def dw(conv):
        return jax.vmap(lambda x, g: jax.vjp(conv, x, w)[1](g)[1])(x, g)

    np.testing.assert_allclose(dw(cpu_ops.conv2d), dw(nn.conv_same), rtol=1e-4, atol=1e-4)


def test_bad_inputs_fail_with_clear_messages():
    params = nn.init_cnn(jax.random.PRNGKey(0), 1, (4,) * 4)
    with pytest.raises(ValueError, match="NHWC"):
        nn.cnn_apply(params, jnp.zeros((2, 1, 28, 28)))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        nn.cnn_apply(params, jnp.zeros((28, 28, 1)))
    with pytest.raises(ValueError, match="too small"):
        nn.cnn_apply(params, jnp.zeros((2, 12, 12, 1)))
    with pytest.raises(ValueError, match="widths"):
        nn.init_cnn(jax.random.PRNGKey(0), 1, ())


# in the slow run (the tap sum's terms are compiled three times);
# test_conv_vjp_matches_autodiff_of_lax_conv checks the first derivatives by default
@pytest.mark.slow
@pytest.mark.parametrize("wrt", [0, 1])
def test_second_derivatives_through_conv2d_match_lax_conv(wrt):
    """Second-order MAML differentiates the hand-written VJP: the gradient of a loss after one
    inner gradient step, L(v - 0.1 grad L(v)), matches JAX's own convolution gradients."""
    x = _images(3, 7, 2, seed=5)
    w = 0.5 * jax.random.normal(jax.random.PRNGKey(6), (3, 3, 2, 3))
    t = jax.random.normal(jax.random.PRNGKey(7), (3, 7, 7, 3))

    def meta_grad(conv):
        def loss(x, w):
            return jnp.sum(jnp.tanh(conv(x, w)) * t)

        def after_step(x, w):
            args = [x, w]
            args[wrt] = args[wrt] - 0.1 * jax.grad(loss, argnums=wrt)(x, w)
            return loss(*args)

        return jax.jit(jax.grad(after_step, argnums=(0, 1)))(x, w)

    for a, b in zip(meta_grad(cpu_ops.conv2d), meta_grad(nn.conv_same), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # and a Hessian-vector product of the kernel
    v = jax.random.normal(jax.random.PRNGKey(8), w.shape)
    hvp = lambda conv: jax.jvp(jax.grad(lambda w: jnp.sum(jnp.tanh(conv(x, w)) * t)), (w,),
                               (v,))[1]
    np.testing.assert_allclose(hvp(cpu_ops.conv2d), hvp(nn.conv_same), rtol=1e-4, atol=1e-5)
    rev = lambda conv: jax.grad(lambda w: jnp.vdot(
        jax.grad(lambda w: jnp.sum(jnp.tanh(conv(x, w)) * t))(w), v))(w)
    np.testing.assert_allclose(rev(cpu_ops.conv2d), hvp(nn.conv_same), rtol=1e-4, atol=1e-5)


def test_max_pool_takes_window_maxima_and_routes_gradients_to_them():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 6, 3))
    ref = np.asarray(x)[:, :6].reshape(2, 3, 2, 3, 2, 3).max(axis=(2, 4))
    np.testing.assert_array_equal(nn.max_pool(x), ref)
    g = jax.grad(lambda x: jnp.sum(nn.max_pool(x) * 2.0))(x)
    xr = np.asarray(x)[:, :6]
    hit = xr == np.repeat(np.repeat(ref, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(np.asarray(g)[:, :6], 2.0 * hit)
    assert np.all(np.asarray(g)[:, 6] == 0)  # the floor-cropped row gets no gradient


def test_max_pool_gradient_goes_to_the_first_maximum_of_a_tie():
    x = jnp.zeros((1, 4, 4, 2)).at[0, 2, 3, 1].set(1.0)  # ties everywhere but one window
    g = jax.grad(lambda x: jnp.sum(nn.max_pool(x)))(x)
    expected = np.zeros((1, 4, 4, 2))
    expected[0, ::2, ::2, :] = 1.0  # each window's top-left element: its first maximum
    expected[0, 2, 2, 1], expected[0, 2, 3, 1] = 0.0, 1.0
    np.testing.assert_array_equal(g, expected)
    # second order: the gradient is linear in the incoming gradient, zero curvature
    hess = jax.grad(lambda x: jnp.vdot(jax.grad(lambda y: jnp.sum(nn.max_pool(y) ** 2))(x),
                                       jnp.ones_like(x)))(x)
    np.testing.assert_array_equal(hess, 2.0 * expected)


def _unfused_block(given):
    """conv -> batch norm -> ReLU -> max-pool as written: the block on XLA's ops."""
    def block(x, w, scale, shift, stats):
        return nn.conv_bn_relu_pool(x, w, scale, shift, stats if given else None, ops="xla")[0]
    return block


def _block(given):
    """The block on the CPU kernels: pooled first (`cpu_ops.conv_bn_relu_pool`)."""
    def block(x, w, scale, shift, stats):
        return cpu_ops.conv_bn_relu_pool(x, w, scale, shift, stats if given else None)[0]
    return block


@pytest.mark.parametrize("given", [True, False])
def test_the_official_block_order_is_bn_of_the_pooled_relu_on_both_ops(given):
    """`conv_relu_pool_bn` on the CPU kernels (pooled first) and on XLA's ops is batch norm
    (statistics given, or those of the pooled activations) of max_pool(relu(conv)) written out
    with lax, in values and gradients."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 7, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
    scale, shift = jnp.array([1.5, -0.5, 0.3, -2.0]), jnp.array([0.1, 0.2, -0.3, 0.0])
    stats = nn.BNStats(jnp.array([0.1, -0.2, 0.0, 0.3]), jnp.array([1.0, 0.5, 2.0, 0.8]))

    def written_out(x, w, scale, shift):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.lax.reduce_window(jax.nn.relu(y), -jnp.inf, jax.lax.max, (1, 2, 2, 1),
                                  (1, 2, 2, 1), "VALID")
        mean, var = (stats.mean, stats.var) if given else (h.mean((0, 1, 2)), h.var((0, 1, 2)))
        return (h - mean) / jnp.sqrt(var + nn.BN_EPS) * scale + shift

    want = written_out(x, w, scale, shift)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    want_grads = jax.grad(loss(written_out), argnums=(0, 1, 2, 3))(x, w, scale, shift)
    for ops in ("cpu", "xla"):
        block = lambda x, w, scale, shift, ops=ops: nn.cnn_block(  # noqa: E731
            x, w, scale, shift, stats if given else None, ops=ops, order="conv-relu-pool-bn")[0]
        np.testing.assert_allclose(jax.jit(block)(x, w, scale, shift), want, rtol=1e-5,
                                   atol=1e-5)
        grads = jax.jit(jax.grad(loss(block), argnums=(0, 1, 2, 3)))(x, w, scale, shift)
        for a, b in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4,
                                       atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))
    with pytest.raises(ValueError, match="CNN.block_order='bn-last': use conv-bn-relu-pool"):
        nn.CNN(4, 2, block_order="bn-last")


@pytest.mark.parametrize("per_example", [False, True])
# row-chunked and with statistics computed inside the block: in the slow run (compiling-heavy)
@pytest.mark.parametrize("rows,given", [(None, True),
                                        pytest.param(5, True, marks=pytest.mark.slow),
                                        pytest.param(None, False, marks=pytest.mark.slow)])
def test_conv_bn_relu_pool_is_the_unfused_block_in_values_and_gradients(monkeypatch, rows,
                                                                         given, per_example):
    """Pooling first (maxima where the scale is >= 0, minima where it is negative) gives the
    same values and first- and second-order gradients (x, w, scale, shift, statistics) as
    conv -> batch norm -> ReLU -> max-pool, on 7x7 maps (floor mode drops a row and a column):
    with statistics given (`conv_pool`: the kernel gradient from the pooled gradient, the
    pooled pixels in one chunk or 5 at a time: several chunks and a tail) or the batch's own;
    vmapped with one kernel and scale for all examples (the conditionals kept) or one per
    example (selects)."""
    if rows:
        monkeypatch.setattr(cpu_ops, "_pooled_kernel_grad_rows", lambda c_in, c_out: rows)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 7, 7, 2))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))
    scale = jnp.array([1.5, -0.5, 0.3, -2.0])
    if per_example:
        w = w * jnp.array([1.0, -0.5, 2.0])[:, None, None, None, None]
        scale = scale * jnp.array([1.0, -1.0, 0.5])[:, None]
    shift = jnp.array([0.1, 0.2, -0.3, 0.0])
    stats = nn.BNStats(jnp.array([0.1, -0.2, 0.0, 0.3]), jnp.array([1.0, 0.5, 2.0, 0.8]))
    axes = (0, 0 if per_example else None, 0 if per_example else None, None, None)
    args = (x, w, scale, shift, stats)

    def loss(block):
        return lambda *a: jnp.sum(jnp.sin(jax.vmap(block, axes)(*a)))

    ours, ref = _block(given), _unfused_block(given)
    np.testing.assert_allclose(jax.jit(jax.vmap(ours, axes))(*args),
                               jax.vmap(ref, axes)(*args), rtol=1e-5, atol=1e-5)
    grads = [jax.jit(jax.grad(loss(b), argnums=(0, 1, 2, 3, 4)))(*args) for b in (ours, ref)]
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):  # rounding: sums of terms
        np.testing.assert_allclose(a, b, rtol=1e-4,  # as large as the largest entries
                                   atol=1e-5 * max(1.0, float(np.max(np.abs(b)))))

    def second(block):  # the gradient of a function of the kernel gradient, as in MAML
        return jax.grad(lambda w: jnp.sum(jax.grad(loss(block), argnums=1)(x, w, *args[2:])
                                          ** 2))

    expected = second(ref)(w)  # float32 rounding relative to the largest entries
    np.testing.assert_allclose(jax.jit(second(ours))(w), expected, rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(expected).max()))
@pytest.mark.slow  # compiling-heavy; the default suite keeps under 10 min


def test_cnn_gradient_under_jit_equals_eager():
    """Regression: with a reshape-and-max (or jnp.maximum) pooling, XLA:CPU dropped part of the
    first block's gradient under jit (0.13 off for values of 0.28 on exactly this case)."""
    from metalearn.learners.maml import MAML
    from tests.test_learners import images

    learner = MAML(nn.CNN(4, 2, 3), inner_steps=2)
    meta = learner.init(jax.random.PRNGKey(1), images().example())
    support = jax.tree.map(lambda a: a[0], images().sample_batch(jax.random.PRNGKey(2), 3)
                           .support())
    present = jnp.ones(3, bool)
    grad = lambda p: jax.grad(lambda a: learner.support_loss(a, support, present))(p)
    for a, b in zip(jax.tree.leaves(grad(meta["params"])),
                    jax.tree.leaves(jax.jit(grad)(meta["params"])), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 10 s; the block-level test above compares the two paths too
def test_the_cnn_on_cpu_kernels_and_on_xla_ops_agree_in_value_and_gradient(monkeypatch):
    """The three ways of computing the CNN (`ops`): the same features, the same gradients of
    every parameter, with the batch's statistics and with given ones."""
    model = {o: nn.CNN(4, 3, out_dim=5, ops=o) for o in ("cpu", "xla", "patches")}
    x = _images(6, 28, 1, seed=3)
    params = model["cpu"].init(jax.random.PRNGKey(0), x)
    _, stats = model["xla"].apply(params, x[:3])
    for given in (None, stats):
        def features(p, m, given=given):
            return m.apply(p, x, given)[0]

        outs = {o: jax.jit(features, static_argnums=1)(params, m) for o, m in model.items()}
        loss = lambda p, m, f=features: jnp.sum(jnp.sin(f(p, m)))
        grads = {o: jax.jit(jax.grad(loss), static_argnums=1)(params, m)
                 for o, m in model.items()}
        for other in ("xla", "patches"):
            np.testing.assert_allclose(outs["cpu"], outs[other], rtol=1e-4, atol=1e-4)
            for a, b in zip(jax.tree.leaves(grads["cpu"]), jax.tree.leaves(grads[other]),
                            strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    assert nn.resolve_ops() == "cpu" and nn.resolve_ops("xla") == "xla"  # CPU backend here
    monkeypatch.setenv(nn.OPS_ENV, "xla")
    assert nn.resolve_ops() == "xla" and nn.resolve_ops("cpu") == "cpu"
    monkeypatch.setenv(nn.OPS_ENV, "gpu")
    with pytest.raises(ValueError, match="ops='gpu': use one of auto, cpu, xla, patches"):
        nn.resolve_ops()
    with pytest.raises(ValueError, match="CNN ops='fast'"):
        nn.CNN(ops="fast")

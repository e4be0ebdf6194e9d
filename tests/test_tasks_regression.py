"""In-context regression task families against NumPy/JAX reference formulas."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import check_episode
from metalearn.tasks import (
    LinearRegression,
    Sinusoid,
    SparseLinearRegression,
    TaskPool,
    TeacherNetwork,
)

KEY = jax.random.PRNGKey(5)


def batch(task, n: int):
    """n episodes of `task` (one compiled call)."""
    return jax.jit(jax.vmap(task.sample))(jax.random.split(KEY, n))


def test_linear_regression_sample_is_the_documented_flat_draw():
    """W and x from one flat uniform vector (normals by erfinv), noise from its own key."""
    t = LinearRegression(dim=3, num_context=4, num_queries=2, dim_out=2, input_range=1.5,
                         weight_scale=0.5, weight_mean=1.0, noise_std=0.1)
    assert [f.name for f in dataclasses.fields(LinearRegression)] == [
        "dim", "num_context", "num_queries", "dim_out", "input_dist", "input_range",
        "weight_scale", "weight_mean", "noise_std"]
    ep = t.sample(KEY)
    ku, kn = jax.random.split(KEY)
    u = np.asarray(jax.random.uniform(ku, (6 + 18,), minval=np.nextafter(np.float32(-1), 0)))
    w = 1.0 + 0.5 * np.sqrt(2) * np.asarray(jax.scipy.special.erfinv(u[:6])).reshape(3, 2)
    x = 1.5 * u[6:].reshape(6, 3)
    y = x @ w + 0.1 * np.asarray(jax.random.normal(kn, (12,))).reshape(6, 2)
    np.testing.assert_allclose(ep.support_x, x[:4], rtol=1e-6)
    np.testing.assert_allclose(ep.query_y, y[4:], rtol=1e-5, atol=1e-6)
    assert t.describe()["sampler"] == "LinearRegression"


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_linear_regression_law(dist):
    """x ~ U(-a, a) or N(0, a^2), W ~ N(m, s^2) (checked beyond the variance), y = x W; the
    flat `sample` and the generic `episode(task_params(...))` (used by TaskPool) agree."""
    t = LinearRegression(dim=3, num_context=20, input_range=0.5, weight_scale=2.0,
                         input_dist=dist)
    for a in (batch(t, 4000), jax.jit(jax.vmap(lambda k: t.episode(
            t.task_params(k), *jax.random.split(jax.random.fold_in(k, 1)))))(
            jax.random.split(KEY, 4000))):
        x = np.asarray(a.support_x)
        if dist == "uniform":
            assert np.abs(x).max() <= 0.5 and abs(x.std() - 0.5 / np.sqrt(3)) < 0.003
            assert abs(np.mean(x > 0.25) - 0.25) < 0.01  # uniform, not only the variance
        else:
            assert abs(x.std() - 0.5) < 0.005 and abs(np.mean(np.abs(x) < 0.5) - 0.6827) < 0.01
        w = np.stack([np.linalg.lstsq(x[i], np.asarray(a.support_y[i]), rcond=None)[0]
                      for i in range(500)])
        assert abs(w.std() - 2.0) < 0.1 and abs(w.mean()) < 0.1
        assert abs(np.mean(np.abs(w) < 2.0) - 0.6827) < 0.03  # normal, not only the variance
        np.testing.assert_allclose(np.asarray(a.query_x[0]) @ w[0], a.query_y[0], atol=1e-4)


def test_sinusoid_maml_defaults():
    t = Sinusoid()
    assert (t.amplitude_min, t.amplitude_max, t.phase_min, t.phase_max, t.input_range) == \
        (0.1, 5.0, 0.0, math.pi, 5.0)
    eps = batch(t, 200)
    check_episode(eps, batched=True)
    assert eps.support_x.shape == (200, 10, 1) and eps.query_y.shape == (200, 10, 1)
    x = np.concatenate([eps.support_x, eps.query_x], 1)[..., 0]
    y = np.concatenate([eps.support_y, eps.query_y], 1)[..., 0]
    assert x.min() >= -5 and x.max() <= 5 and x.min() < -4.5 and x.max() > 4.5
    amp = np.abs(y).max(1)
    assert amp.max() <= 5.0 + 1e-5 and amp.min() < 1.0
    # recover (A, phase) of episode 0 exactly from the task key
    kw, _, _ = jax.random.split(jax.random.split(KEY, 200)[0], 3)
    a, p = t.task_params(kw)
    np.testing.assert_allclose(y[0], a * np.sin(x[0] - p), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_teacher_network(act):
    t = TeacherNetwork(dim=3, hidden=7, dim_out=2, activation=act, bias_scale=0.3,
                       num_context=5, num_queries=3)
    ep, th = jax.jit(lambda k: (t.sample(k), t.task_params(jax.random.split(k, 3)[0])))(KEY)
    assert ep.support_x.shape == (5, 3) and ep.support_y.shape == (5, 2)
    f = np.tanh if act == "tanh" else (lambda v: np.maximum(v, 0))
    x = np.asarray(ep.query_x)
    ref = f(x @ np.asarray(th["w1"]) + np.asarray(th["b1"])) @ np.asarray(th["w2"]) + \
        np.asarray(th["b2"])
    np.testing.assert_allclose(ep.query_y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation must be 'tanh' or 'relu', got 'gelu'"):
        TeacherNetwork(activation="gelu")


def test_sparse_linear():
    t = SparseLinearRegression(dim=8, nonzero=3, num_context=20)
    ws = jax.jit(jax.vmap(t.task_params))(jax.random.split(KEY, 50))
    nz = np.count_nonzero(np.asarray(ws)[..., 0], axis=1)
    assert np.all(nz == 3)
    assert len({tuple(np.flatnonzero(w[:, 0])) for w in np.asarray(ws)}) > 5
    with pytest.raises(ValueError, match=r"nonzero must lie in \[1, dim=8\], got 9"):
        SparseLinearRegression(dim=8, nonzero=9)


def test_ood_variants():
    t = TeacherNetwork(input_range=1.0, weight_scale=1.0, bias_scale=0.5)
    o = t.ood(input_scale=3.0, weight_scale=2.0)
    assert (o.input_range, o.weight_scale, o.bias_scale) == (3.0, 2.0, 1.0)
    s = Sinusoid().ood(input_scale=2.0, weight_scale=0.5)
    assert (s.input_range, s.amplitude_min, s.amplitude_max) == (10.0, 0.05, 2.5)
    lin = LinearRegression().ood(weight_scale=4.0, weight_mean=2.0)
    assert (lin.weight_scale, lin.weight_mean, lin.input_range) == (4.0, 2.0, 0.5)
    ep = LinearRegression(dim=2, num_context=50).ood(input_scale=10.0).sample(KEY)
    assert float(jnp.abs(ep.support_x).max()) > 4.0


def test_task_pool_is_finite_with_fresh_inputs():
    pool = TaskPool(LinearRegression(dim=2, num_context=3), num_tasks=4, seed=1)
    fresh_task = LinearRegression(dim=2, num_context=3)
    keys = jax.random.split(KEY, 64)
    eps, fresh, pool_ws = jax.jit(lambda k: (jax.vmap(pool.sample)(k),
                                             jax.vmap(fresh_task.sample)(k),
                                             jax.vmap(pool.task_params)(jnp.arange(4))))(keys)
    x, y = np.asarray(eps.support_x), np.asarray(eps.support_y)
    ws = {tuple(np.round(np.linalg.lstsq(x[i], y[i], rcond=None)[0].ravel(), 4))
          for i in range(64)}
    assert len(ws) == 4  # only four distinct tasks, exactly the pool's
    assert ws == {tuple(np.round(w.ravel(), 4)) for w in np.asarray(pool_ws)}
    assert len({tuple(x[i].ravel()) for i in range(64)}) == 64  # inputs are fresh
    fx, fy = np.asarray(fresh.support_x), np.asarray(fresh.support_y)
    fresh_ws = {tuple(np.round(np.linalg.lstsq(fx[i], fy[i], rcond=None)[0].ravel(), 4))
                for i in range(64)}
    assert len(fresh_ws) == 64  # the prior: a new task every episode
    assert pool.describe()["task"]["sampler"] == "LinearRegression"
    with pytest.raises(ValueError, match="TaskPool.num_tasks must be >= 1, got 0"):
        TaskPool(LinearRegression(), 0)


def test_validation_messages():
    with pytest.raises(ValueError, match="LinearRegression.num_context must be >= 1, got 0"):
        LinearRegression(num_context=0)
    with pytest.raises(ValueError, match="unknown input_dist 'cauchy'"):
        Sinusoid(input_dist="cauchy")

"""LSA learners and the GD / GD++ construction (von Oswald et al. 2023)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import Episode, Support, TaskSampler
from metalearn.learners.gd import GradientDescent, LeastSquares, fit_step_sizes
from metalearn.learners.lsa import (
    LSA,
    effective_step,
    gd_construction,
    interpolate_with_construction,
)
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.regression import LinearRegression


def _task(d: int, n: int, q: int = 3, dy: int = 1, seed: int = 0) -> Episode:
    """A linear-regression episode, x ~ U(-0.5, 0.5)^d, W ~ N(0, I) (NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 0.5, (n + q, d)).astype(np.float32)
    y = x @ rng.normal(size=(d, dy)).astype(np.float32)
    return Episode(*(jnp.asarray(a) for a in (x[:n], y[:n], x[n:], y[n:])))


@functools.partial(jax.jit, static_argnums=0)
def _predict(learner, meta, ep: Episode) -> jax.Array:
    """The learner's query predictions for one episode (compiled: faster than op by op)."""
    return learner.predict(meta, learner.adapt(meta, ep.support(), None), ep.query_x)


def _init(learner, seed: int, ep: Episode, scale: float = 0.3):
    """Random meta-parameters shaped like `learner.init`'s (NumPy: nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(learner.init, jax.random.PRNGKey(0), ep)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def _explicit_gd(ep: Episode, eta: float, steps: int) -> np.ndarray:
    """K GD steps on L(W) = 1/(2N) sum ||x_i W - y_i||^2 from W = 0 (float64, autodiff-free)."""
    x, y = np.asarray(ep.support_x, np.float64), np.asarray(ep.support_y, np.float64)
    w = np.zeros((x.shape[1], y.shape[1]))
    for _ in range(steps):
        w = w - eta * x.T @ (x @ w - y) / x.shape[0]
    return np.asarray(ep.query_x, np.float64) @ w


def _explicit_gd_plus_plus(ep: Episode, eta: float, gamma: float, steps: int) -> np.ndarray:
    """GD++ as the token recursion of the paper: every token's x <- (I - gamma X^T X / N) x and
    y-slot <- y-slot - (eta/N) x^T X^T R; the prediction is minus the query's y-slot."""
    x, r = np.asarray(ep.support_x, np.float64), np.asarray(ep.support_y, np.float64)
    xq = np.asarray(ep.query_x, np.float64)
    sq = np.zeros((xq.shape[0], r.shape[1]))
    n = x.shape[0]
    for _ in range(steps):
        xtr, h = x.T @ r, x.T @ x / n
        r, sq = r - eta / n * x @ xtr, sq - eta / n * xq @ xtr
        x, xq = x - gamma * x @ h, xq - gamma * xq @ h
    return -sq


@pytest.mark.parametrize("d,n,k,dy", [(1, 4, 1, 1), (3, 7, 2, 1), (5, 5, 3, 2), (10, 10, 4, 1),
                                      (6, 20, 5, 3)])
def test_construction_is_gradient_descent(d, n, k, dy):
    ep = _task(d, n, dy=dy, seed=d + n)
    eta = 0.8 / float(np.mean(np.asarray(ep.support_x) ** 2))  # well inside the stable range
    want = _explicit_gd(ep, eta, k)
    for recurrent in (True, False):
        lsa = LSA(num_layers=k, recurrent=recurrent)
        meta = gd_construction(d, dy, eta, n, num_layers=k, recurrent=recurrent)
        got = _predict(lsa, meta, ep)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    gd = GradientDescent(steps=k, lr=eta)
    got = _predict(gd, gd.init(None, ep), ep)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_construction_all_tokens_hold_residuals():
    """After K constructed layers each context token holds (x_i, y_i - x_i W_K)."""
    ep = _task(4, 9, seed=3)
    eta, k = 3.0, 3
    lsa = LSA(num_layers=k)
    meta = gd_construction(4, 1, eta, 9, num_layers=k)
    h = lsa.forward(meta, lsa.tokens(meta, ep.support(), ep.query_x), 9, queries_only=False)
    x, y = np.asarray(ep.support_x, np.float64), np.asarray(ep.support_y, np.float64)
    w = np.zeros((4, 1))
    for _ in range(k):
        w = w - eta * x.T @ (x @ w - y) / 9
    np.testing.assert_allclose(h[:9, :4], x, atol=1e-6)
    np.testing.assert_allclose(h[:9, 4:], y - x @ w, atol=1e-5)


@pytest.mark.parametrize("d,n,k", [(3, 6, 2), (10, 10, 3), (4, 12, 4)])
def test_gd_plus_plus_construction_matches_its_math(d, n, k):
    ep = _task(d, n, q=4, seed=k)
    m = float(np.mean(np.asarray(ep.support_x) ** 2))
    eta, gamma = 0.7 / m, 0.3 / m
    want = _explicit_gd_plus_plus(ep, eta, gamma, k)
    lsa = LSA(num_layers=k)
    meta = gd_construction(d, 1, eta, n, gamma=gamma, num_layers=k)
    got = _predict(lsa, meta, ep)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    gd = GradientDescent(steps=k, lr=eta, gamma=gamma, plus_plus=True)
    got = _predict(gd, gd.init(None, ep), ep)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # with gamma = 0 GD++ is GD, and with one step gamma has no effect on the prediction
    np.testing.assert_allclose(_explicit_gd_plus_plus(ep, eta, 0.0, k), _explicit_gd(ep, eta, k),
                               rtol=1e-10)
    np.testing.assert_allclose(_explicit_gd_plus_plus(ep, eta, gamma, 1),
                               _explicit_gd(ep, eta, 1), rtol=1e-10)


def test_gd_attention_is_gd_on_the_features():
    """With fixed GD attention and no embedding the learner is GD; with an embedding it is GD
    on phi(x), and only the embedding and eta are meta-parameters."""
    ep = _task(4, 8, seed=7)
    lsa = LSA(gd_attention=True)
    meta = {"eta": jnp.asarray(3.0)}
    np.testing.assert_allclose(_predict(lsa, meta, ep), _explicit_gd(ep, 3.0, 1), rtol=1e-4)
    mlp = LSA(gd_attention=True, embed_size=6)
    meta = _init(mlp, 0, ep)
    assert set(meta) == {"eta", "embed"}
    feats = Episode(mlp.features(meta, ep.support_x), ep.support_y,
                    mlp.features(meta, ep.query_x), ep.query_y)
    want = _explicit_gd(feats, float(meta["eta"]), 1)
    np.testing.assert_allclose(_predict(mlp, meta, ep), want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="gd_attention"):
        LSA(gd_attention=True, softmax=True)


def test_recurrent_equals_unrolled_with_tied_weights():
    ep = _task(5, 8, seed=1)
    rec = LSA(num_layers=3, recurrent=True, num_heads=2, init_scale=1.0)
    meta = _init(rec, 2, ep)
    unrolled = dataclasses.replace(rec, recurrent=False)
    stacked = {"attn": jax.tree.map(lambda a: jnp.stack([a] * 3), meta["attn"])}
    a, b = _predict(rec, meta, ep), _predict(unrolled, stacked, ep)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jax.tree.leaves(_init(unrolled, 0, ep))[0].shape[0] == 3


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "recurrent": False},
                                {"softmax": True, "num_heads": 2}, {"layer_norm": True},
                                {"embed_size": 8, "num_layers": 2}])
def test_queries_are_independent(kw):
    """One sequence with Q queries == Q sequences with one query each."""
    ep = _task(4, 6, q=5, seed=4)
    lsa = LSA(init_scale=1.0, **kw)
    meta = _init(lsa, 1, ep)
    predict = jax.jit(lsa.predict)
    state = lsa.adapt(meta, ep.support(), None)
    together = predict(meta, state, ep.query_x)
    alone = jnp.concatenate([predict(meta, state, ep.query_x[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    assert together.shape == ep.query_y.shape


def test_linear_attention_matches_token_by_token_formula():
    """e_j <- e_j + sum_h P_h^T sum_i (q_j . k_i) v_i for every token, keys from the context."""
    ep = _task(3, 5, q=2, seed=5)
    lsa = LSA(num_heads=2, key_size=3, init_scale=1.0)
    meta = _init(lsa, 3, ep)
    p = meta["attn"]
    h = np.asarray(lsa.tokens(meta, ep.support(), ep.query_x), np.float64)
    want = h.copy()
    for j in range(h.shape[0]):
        for hd in range(2):
            q = h[j] @ np.asarray(p["query"][hd])
            for i in range(5):
                k, v = h[i] @ np.asarray(p["key"][hd]), h[i] @ np.asarray(p["value"][hd])
                want[j] += (q @ k) * (v @ np.asarray(p["proj"][hd]))
    got = lsa.forward(meta, jnp.asarray(h, jnp.float32), 5, queries_only=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_init_scale_and_shapes():
    ep = _task(10, 10)
    meta = LSA().init(jax.random.PRNGKey(0), ep)
    assert meta["attn"]["query"].shape == (1, 11, 11)
    assert meta["attn"]["proj"].shape == (1, 11, 11)
    std = float(jnp.std(meta["attn"]["query"]))
    assert 0.005 < std < 0.03  # VarianceScaling(0.002), fan-in 11: ~ sqrt(0.002/11) = 0.0135
    with pytest.raises(ValueError, match="regression"):
        LSA().init(jax.random.PRNGKey(0), ep._replace(support_y=jnp.zeros(10, jnp.int32),
                                                       query_y=jnp.zeros(1, jnp.int32)))


def test_effective_step_and_interpolation_of_the_construction():
    ep = _task(6, 10)
    cons = gd_construction(6, 1, 4.0, 10, gamma=0.5)
    steps = effective_step(cons, 10, 6)
    assert float(steps["eta"]) == pytest.approx(4.0, rel=1e-6)
    assert float(steps["gamma"]) == pytest.approx(0.5, rel=1e-6)
    # rescaling W_Q by c and P by 1/c changes nothing after the symmetry is removed
    scaled = {"attn": dict(cons["attn"], query=3.0 * cons["attn"]["query"],
                           proj=cons["attn"]["proj"] / 3.0)}
    mid = interpolate_with_construction(scaled, cons, 6)
    a, b = _predict(LSA(), cons, ep), _predict(LSA(), mid, ep)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@dataclasses.dataclass(frozen=True, eq=False)
class _Fixed(TaskSampler):
    """Pre-drawn episodes (NumPy) served as a batch: no sampler to compile."""

    episodes: Episode

    def sample_batch(self, key, batch_size):
        return jax.tree.map(lambda a: jnp.asarray(a[:batch_size]), self.episodes)


def test_least_squares_and_line_search():
    ep = _task(4, 12, seed=2)
    np.testing.assert_allclose(_predict(LeastSquares(), {}, ep), ep.query_y, atol=1e-4)
    # one GD step: loss(eta) is a quadratic, argmin E[a b] / E[a^2] with a = x_q X^T Y / N
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, (1000, 11, 5)).astype(np.float32)
    y = x @ rng.normal(size=(1000, 5, 1)).astype(np.float32)
    task = _Fixed(Episode(x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]))
    meta, loss = fit_step_sizes(GradientDescent(steps=1), task, None, num_tasks=1000)
    a = np.einsum("bqd,bnd,bny->bqy", x[:, 10:], x[:, :10], y[:, :10]) / 10
    best = float(np.sum(a * y[:, 10:]) / np.sum(a * a))
    assert float(meta["lr"]) == pytest.approx(best, rel=2e-3)
    assert loss == pytest.approx(float(0.5 * np.mean((best * a - y[:, 10:]) ** 2)), rel=1e-4)
    # GD++ with two steps beats two steps of GD at their best step sizes
    gd2, l2 = fit_step_sizes(GradientDescent(steps=2), task, None, num_tasks=1000)
    pp, lpp = fit_step_sizes(GradientDescent(steps=2, plus_plus=True), task, None, 1000)
    assert lpp < 0.9 * l2 and float(pp["gamma"]) > 0 and float(gd2["gamma"]) == 0


def test_short_training_lowers_the_loss():
    task = LinearRegression(dim=3, num_context=10, input_range=0.5)
    lsa = LSA(init_scale=0.5)
    outer = GradientOuterLoop(optimizer="adam", learning_rate=2e-2, batch_size=128,
                              steps_per_call=50)
    state = outer.init(lsa, task, jax.random.PRNGKey(0))
    state, m = outer.compiled_steps(lsa, task)(state, 300)  # 150 steps reach GD for only some seeds
    first, last = float(np.mean(m["loss"][:10])), float(np.mean(m["loss"][-30:]))
    # the best one-step GD: a quadratic in eta, minimised in closed form on numpy tasks
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, (20000, 11, 3))
    y = x @ rng.normal(size=(20000, 3, 1))
    a = np.einsum("bd,bnd,bn->b", x[:, -1], x[:, :-1], y[:, :-1, 0]) / 10
    eta = np.sum(a * y[:, -1, 0]) / np.sum(a * a)
    gd_loss = 0.5 * np.mean((eta * a - y[:, -1, 0]) ** 2)
    assert last < 0.7 * first
    assert last < 1.15 * gd_loss  # it reaches (about) the best one-step GD


def test_support_state_is_the_context():
    ep = _task(3, 4)
    s = LSA().adapt({}, ep.support(), None)
    assert isinstance(s, Support) and s.x is ep.support_x

"""Truncated unrolls and their estimators: pieces equal the whole, PES recovers the gradient
through earlier truncations that truncated backprop drops, and both lower a loss."""

from __future__ import annotations

from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.learners.hebbian import HebbianLearner
from metalearn.learners.lopt import AdafacLOpt
from metalearn.outer.driver import RunOptions
from metalearn.outer.truncated import Particles, TruncatedOuterLoop, Unrollable
from metalearn.tasks.fewshot import FewShotSampler
from metalearn.tasks.testing import synthetic_dataset

NET = dict(ways=3, hidden=(6,), inner_steps=4)


@cache
def sampler() -> FewShotSampler:
    return FewShotSampler(synthetic_dataset(classes=12, examples=8, size=6), 3, 4, 4)


def _close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw),
                 a, b)


@pytest.mark.parametrize("cls", [HebbianLearner, pytest.param(AdafacLOpt,
                                                                 marks=pytest.mark.slow)])
def test_unrolling_in_pieces_equals_one_unroll_and_adapt(cls):
    learner = cls(**NET, inner_batch_size=4) if cls is AdafacLOpt else cls(**NET)
    assert isinstance(learner, Unrollable) and learner.horizon == 4
    ep = sampler().sample(jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(1)
    meta = learner.init(key, ep)
    c0 = learner.unroll_init(meta, ep, key)
    c_a, l_a, _ = learner.unroll(meta, c0, ep, jnp.asarray(0), 2)
    c_b, l_b, _ = learner.unroll(meta, c_a, ep, jnp.asarray(2), 2)
    c_w, l_w, m_w = learner.unroll(meta, c0, ep, jnp.asarray(0), 4)
    _close(c_b, c_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((l_a + l_b) / 2, l_w, rtol=1e-5)
    # the whole unroll is adapt's training; its loss the mean of the curve over steps 1..T
    _close(c_w[0], learner.adapt(meta, ep.support(), key), rtol=1e-5, atol=1e-6)
    curve = learner.curve(meta, ep, key, 4)
    np.testing.assert_allclose(l_w, np.mean(curve["loss"][1:]), rtol=1e-5)
    np.testing.assert_allclose(m_w["accuracy"], np.mean(curve["accuracy"][1:]), rtol=1e-5)


def _one_task(loop: TruncatedOuterLoop, learner, meta):
    """`loop.batch_size` copies of one task at step 0, as `Particles`."""
    ep = sampler().sample(jax.random.PRNGKey(3))
    carry = learner.unroll_init(meta, ep, jax.random.PRNGKey(4))
    n = loop.batch_size
    rep = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)  # noqa: E731
    xi = jax.tree.map(lambda a: jnp.zeros((n, *a.shape)), meta)
    return ep, carry, Particles(rep(ep), (rep(carry), rep(carry)), jnp.zeros(n, jnp.int32), xi)
@pytest.mark.slow  # compiling-heavy; the default suite keeps under 10 min


def test_pes_recovers_the_gradient_through_the_earlier_truncation():
    """Two truncations of K=2 steps: PES's estimate after the second matches d L_2 / d theta
    with L_2 depending on theta also through the state the first truncation left; truncated
    backprop's gradient (that state held constant) does not."""
    learner = HebbianLearner(**NET)
    meta = learner.init(jax.random.PRNGKey(0), sampler().example())
    loop = TruncatedOuterLoop(estimator="pes", truncation=2, horizon=4, std=1e-4,
                              batch_size=4096)
    ep, carry, p = _one_task(loop, learner, meta)
    _, _, carry1, ok, xi, _ = loop.estimate(learner, meta, p, jax.random.PRNGKey(5))
    p2 = Particles(p.episodes, carry1, p.t + 2, xi)
    g_pes, _, _, ok2, _, _ = loop.estimate(learner, meta, p2, jax.random.PRNGKey(6))
    assert bool(jnp.all(ok)) and bool(jnp.all(ok2))

    def second(theta, through_first=True):
        c1, _, _ = learner.unroll(theta, carry, ep, jnp.asarray(0), 2)
        if not through_first:
            c1 = jax.lax.stop_gradient(c1)
        return learner.unroll(theta, c1, ep, jnp.asarray(2), 2)[1]

    flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])  # noqa: E731
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    true, truncated = flat(jax.grad(second)(meta)), flat(jax.grad(second)(meta, False))
    est = flat(g_pes)
    err = lambda g: float(np.linalg.norm(g - true) / np.linalg.norm(true))  # noqa: E731
    print(f"relative error: pes {err(est):.3f}, truncated backprop {err(truncated):.3f}; "
          f"cosine pes {cos(est, true):.4f}")
    assert err(truncated) > 0.4  # the earlier truncation matters in this setting
    assert err(est) < 0.15 and cos(est, true) > 0.98


@pytest.mark.slow  # 60 meta-steps of each estimator
@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
def test_truncated_loops_lower_the_whole_unroll_loss(estimator):
    """A horizon of 4 truncations: both estimators lower the query loss of whole unrolls on
    held-out two-moons tasks; tasks restart, staggered, as they reach the horizon."""
    from metalearn.tasks.functions2d import Functions2D

    tasks = Functions2D(families=("moons",), num_support=32, num_queries=32)
    lopt = AdafacLOpt(ways=2, hidden=(8,), inner_steps=8, step_mult=0.02,
                      meta_loss="cross_entropy")
    held = tasks.sample_batch(jax.random.PRNGKey(99), 64)
    keys = jax.random.split(jax.random.PRNGKey(1), 64)
    query_loss = jax.jit(lambda meta: jnp.mean(jax.vmap(
        lambda e, k: lopt.loss(meta, e, k)[0])(held, keys)))
    kw = {"std": 0.03} if estimator == "pes" else {}
    loop = TruncatedOuterLoop(estimator=estimator, truncation=2, batch_size=16,
                              learning_rate=1e-2, steps_per_call=20, **kw)
    key = jax.random.PRNGKey(0)
    before = float(query_loss(loop.meta_params(loop.init(lopt, tasks, key))))
    res = loop.run(lopt, tasks, key, steps=60, options=RunOptions(progress=False))
    after = float(query_loss(res.meta))
    assert after < before - 0.1, (before, after)
    restarted = [r["restarted"] for r in res.history if r["split"] == "train"]
    assert np.mean(restarted) == pytest.approx(0.25, abs=0.03)  # one task in 4 per step
    assert np.std(restarted) < 0.15  # staggered; in lock step it would be 0.43


@pytest.mark.slow  # 35 s of compiling; the toy test below checks the cap's arithmetic by default
@pytest.mark.parametrize("estimator", ["pes", "tbptt"])
def test_losses_above_max_loss_add_nothing_and_restart_their_tasks(estimator):
    """max_loss below every truncation loss: the estimate is zero (PES: both sides capped) and
    every task restarts, as for a NaN loss; far above every loss: the same estimate as without
    a bound."""
    learner = HebbianLearner(**NET)
    key = jax.random.PRNGKey(3)

    def one_step(**kw):
        loop = TruncatedOuterLoop(estimator=estimator, truncation=2, batch_size=4, **kw)
        state = loop.init(learner, sampler(), key)
        return loop.step(learner, sampler(), state)

    free, m_free = one_step()
    assert float(m_free["diverged"]) == 0.0 and float(m_free["grad_norm"]) > 0
    loose, m_loose = one_step(max_loss=1e9)
    _close(loose.params, free.params, rtol=1e-6)
    tight, m_tight = one_step(max_loss=1e-6)
    assert float(m_tight["diverged"]) == 1.0 and float(m_tight["restarted"]) == 1.0
    assert float(m_tight["grad_norm"]) == 0.0
    assert np.all(np.asarray(tight.opt_state[1].t) == 0)  # every task back at step 0


class _Exploding:
    """A scalar rule whose truncation loss is 1 + 1000 a: PES pairs straddle any cap near 1."""

    horizon = 4

    def init(self, key, example):
        return {"a": jnp.zeros(())}

    def unroll_init(self, meta, episode, key):
        return jnp.zeros(())

    def unroll(self, meta, carry, episode, t0, steps):
        return carry, 1.0 + 1000.0 * meta["a"], {}


def test_pes_scores_a_loss_above_max_loss_as_max_loss():
    """g = sum_i (min(L+, cap) - min(L-, cap)) xi_i / (2 sigma^2 N): a pair with one side over
    the cap still counts, and tasks over it restart."""
    learner, cap = _Exploding(), 6.0
    loop = TruncatedOuterLoop(truncation=2, batch_size=16, std=0.01, max_loss=cap)
    state = loop.init(learner, sampler(), jax.random.PRNGKey(0))
    key = jax.random.PRNGKey(4)
    grad, loss, _, ok, xi, _ = loop.estimate(learner, state.params, state.opt_state[1], key)
    eps = np.asarray(loop._perturbations(state.params, key)["a"])
    l_plus, l_minus = np.minimum(1 + 1000 * eps, cap), np.minimum(1 - 1000 * eps, cap)
    assert 0 < np.sum(l_plus == cap) < 16  # some pairs straddle the cap
    want = np.sum((l_plus - l_minus) * eps) / (2 * 0.01 ** 2 * 16)
    np.testing.assert_allclose(grad["a"], want, rtol=1e-4)
    np.testing.assert_allclose(loss, np.mean(0.5 * (l_plus + l_minus)), rtol=1e-5)
    np.testing.assert_array_equal(ok, (1 + 1000 * np.abs(eps)) <= cap)


def test_errors_name_the_field_and_the_fix():
    from metalearn.learners.protonet import ProtoNet
    from metalearn.nn import MLP

    with pytest.raises(ValueError, match="estimator='es'; choose one of pes, tbptt"):
        TruncatedOuterLoop(estimator="es")
    with pytest.raises(ValueError, match="std must be > 0"):
        TruncatedOuterLoop(std=0.0)
    with pytest.raises(ValueError, match="max_loss must be >= 0"):
        TruncatedOuterLoop(max_loss=-1.0)
    loop = TruncatedOuterLoop(truncation=8)
    with pytest.raises(ValueError, match="shorter than one truncation"):
        loop.init(HebbianLearner(**NET), sampler(), jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="ProtoNet has no truncated unrolls"):
        loop.init(ProtoNet(MLP((8,))), sampler(), jax.random.PRNGKey(0))

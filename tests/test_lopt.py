"""Learned optimizers: features, update rule and starting point against the formulas, the
NaN guard, step offsets, and meta-training that lowers the query loss."""

from __future__ import annotations

import dataclasses
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.experiment import Experiment
from metalearn.experiments import lopt_omniglot
from metalearn.learners.lopt import (
    FUSED_WIDTH,
    MLP_DECAYS,
    TIME_SCALES,
    AdafacLOpt,
    MLPLOpt,
    second_moment_normalize,
    second_moments,
    time_features,
)
from metalearn.learners.network import Network
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.fewshot import FewShotSampler
from metalearn.tasks.functions2d import Functions2D
from metalearn.tasks.testing import synthetic_dataset
from tests.helpers import MINIMAL_NO_VALIDATION, needs_omniglot

NET = dict(ways=3, hidden=(6,), inner_steps=4)


@cache
def sampler() -> FewShotSampler:
    return FewShotSampler(synthetic_dataset(classes=12, examples=8, size=6), 3, 4, 4)


def episode():
    return sampler().sample(jax.random.PRNGKey(0))


@pytest.mark.slow
def test_meta_parameter_counts_are_the_reference_models():
    ep = episode()
    for cls, n in ((MLPLOpt, 1762), (AdafacLOpt, 134)):
        meta = cls(**NET).init(jax.random.PRNGKey(0), ep)
        assert sum(a.size for a in jax.tree.leaves(meta)) == n


def test_mlplopt_features_are_normalised_momenta():
    lopt = MLPLOpt(**NET)
    key = jax.random.PRNGKey(1)
    p = jax.random.normal(key, (5, 4))
    gs = [jax.random.normal(jax.random.fold_in(key, i), (5, 4)) for i in range(3)]
    acc = lopt.init_accumulators(p)
    for g in gs:
        acc = lopt.accumulate(acc, g)
    for j, b in enumerate(MLP_DECAYS):  # m <- b m + (1 - b) g, from zero
        m = np.zeros((5, 4))
        for g in gs:
            m = b * m + (1 - b) * np.asarray(g)
        np.testing.assert_allclose(acc[j], m, rtol=1e-5, atol=1e-7)
    f = lopt.tensor_features(p, gs[-1], acc)
    assert f.shape == (5, 4, 8)
    np.testing.assert_allclose(f[..., 0], np.asarray(gs[-1]) / np.sqrt(
        1e-5 + np.mean(np.asarray(gs[-1]) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(np.mean(np.asarray(f[..., :2]) ** 2, axis=(0, 1)), 1.0,
                               rtol=1e-3)


@pytest.mark.parametrize("cls", [MLPLOpt, AdafacLOpt])
def test_update_is_p_minus_d_exp_a_times_constants(cls):
    lopt = cls(**NET, start="random", step_mult=0.3, exp_mult=0.5)
    meta = lopt.init(jax.random.PRNGKey(2), episode())
    p = jax.random.normal(jax.random.PRNGKey(3), (4, 3))
    g = jax.random.normal(jax.random.PRNGKey(4), (4, 3))
    t = jnp.asarray(7)
    new, acc = lopt.step(meta, p, g, lopt.init_accumulators(p), t)
    feats = lopt.tensor_features(p, g, acc)
    tf = np.tanh(7.0 / np.asarray(TIME_SCALES) - 1.0)
    x = np.concatenate([np.asarray(feats), np.broadcast_to(tf, (4, 3, len(tf)))], -1)
    h = x.reshape(-1, x.shape[-1])
    for lay in meta["mlp"][:-1]:
        h = np.maximum(h @ np.asarray(lay["w"]) + np.asarray(lay["b"]), 0.0)
    out = (h @ np.asarray(meta["mlp"][-1]["w"]) + np.asarray(meta["mlp"][-1]["b"])).reshape(
        4, 3, 2)
    want = np.asarray(p) - out[..., 0] * np.exp(out[..., 1] * 0.5) * 0.3
    np.testing.assert_allclose(new, want, rtol=1e-4, atol=1e-5)


def test_second_moments_and_their_gradient_are_the_mean_squares():
    xs = [jax.random.normal(jax.random.PRNGKey(i), (6, 5)) * (i + 1) for i in range(4)]
    want = [np.mean(np.asarray(x) ** 2) for x in xs]
    np.testing.assert_allclose(second_moments(xs), want, rtol=1e-6)
    f = lambda a: jnp.sum(jnp.arange(1.0, 4.0) * second_moments([a, a ** 3, jnp.sin(a)]))
    ref = lambda a: (jnp.mean(a ** 2) + 2 * jnp.mean(a ** 6) + 3 * jnp.mean(jnp.sin(a) ** 2))
    np.testing.assert_allclose(jax.grad(f)(xs[0]), jax.grad(ref)(xs[0]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("width", [FUSED_WIDTH, FUSED_WIDTH + 1])
def test_the_mlp_of_split_inputs_is_the_mlp_of_the_stacked_ones(width):
    """`mlp_of` (step features as one bias; fused sums up to FUSED_WIDTH units, products
    beyond) equals `mlp` of the whole input array."""
    lopt = AdafacLOpt(**NET, hidden_size=width, hidden_layers=2, start="random")
    meta = lopt.init(jax.random.PRNGKey(0), episode())
    p = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
    g = jax.random.normal(jax.random.PRNGKey(2), (5, 3))
    feats = lopt.feature_list(p, g, lopt.accumulate(lopt.init_accumulators(p), g))
    tf = time_features(jnp.asarray(12))
    whole = jnp.concatenate([jnp.stack(feats, -1), jnp.broadcast_to(tf, (5, 3, tf.size))], -1)
    for got, want in zip(lopt.mlp_of(meta, feats, tf), lopt.mlp(meta, whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [MLPLOpt, AdafacLOpt])
def test_sgd_start_is_normalised_gradient_descent(cls):
    lopt = cls(**NET, step_mult=0.05)
    meta = lopt.init(jax.random.PRNGKey(5), episode())
    p = jax.random.normal(jax.random.PRNGKey(6), (4, 3))
    g = jax.random.normal(jax.random.PRNGKey(7), (4, 3))
    new, _ = lopt.step(meta, p, g, lopt.init_accumulators(p), jnp.asarray(0))
    np.testing.assert_allclose(new, p - 0.05 * second_moment_normalize(g), rtol=1e-5,
                               atol=1e-6)


def test_zero_output_leaves_parameters_and_a_hand_set_mlp_is_normalised_momentum_sgd():
    """A zero last layer (d = a = 0) changes nothing; the sgd start's path moved from g's row to
    m_0.9's is SGD with momentum on the per-tensor normalised momentum, step after step."""
    lopt = MLPLOpt(**NET, step_mult=0.05)
    meta = lopt.init(jax.random.PRNGKey(5), episode())
    p = jax.random.normal(jax.random.PRNGKey(6), (4, 3))
    g = jax.random.normal(jax.random.PRNGKey(7), (4, 3))
    last = {"w": jnp.zeros_like(meta["mlp"][-1]["w"]), "b": jnp.zeros_like(meta["mlp"][-1]["b"])}
    still = {"mlp": [*meta["mlp"][:-1], last]}
    new, _ = lopt.step(still, p, g, lopt.init_accumulators(p), jnp.asarray(0))
    np.testing.assert_array_equal(new, p)
    row = 2 + MLP_DECAYS.index(0.9)  # features: g, p, then the momenta
    w0 = meta["mlp"][0]["w"]
    w0 = w0.at[row].set(w0[0]).at[0, :2].set(0.0)
    momentum = {"mlp": [{"w": w0, "b": meta["mlp"][0]["b"]}, *meta["mlp"][1:]]}
    acc, m = lopt.init_accumulators(p), np.zeros((4, 3))
    for i in range(3):
        g = jax.random.normal(jax.random.PRNGKey(10 + i), (4, 3))
        m = 0.9 * m + 0.1 * np.asarray(g)
        new, acc = lopt.step(momentum, p, g, acc, jnp.asarray(i))
        np.testing.assert_allclose(new, p - 0.05 * m / np.sqrt(1e-5 + np.mean(m ** 2)),
                                   rtol=1e-5, atol=1e-6)
        p = new


def test_adam_start_steps_along_normalised_m_over_sqrt_v():
    """start="adam": d is m_0.9 / sqrt(v), normalised per tensor, and a = 0, at every step."""
    lopt = AdafacLOpt(**NET, step_mult=0.05, start="adam")
    meta = lopt.init(jax.random.PRNGKey(5), episode())
    p = jax.random.normal(jax.random.PRNGKey(6), (4, 3))
    acc = lopt.init_accumulators(p)
    for i in range(3):
        g = jax.random.normal(jax.random.PRNGKey(7 + i), (4, 3))
        new, acc = lopt.step(meta, p, g, acc, jnp.asarray(i))
        want = p - 0.05 * second_moment_normalize(acc["m"][0] * jax.lax.rsqrt(acc["v"] + 1e-8))
        np.testing.assert_allclose(new, want, rtol=1e-5, atol=1e-6)
        p = new


@pytest.mark.slow
def test_a_diverged_inner_run_gives_the_capped_loss_and_finite_gradients():
    lopt = MLPLOpt(**NET, step_mult=float("inf"), loss_cap=7.5, meta_loss="cross_entropy")
    meta = lopt.init(jax.random.PRNGKey(8), episode())
    raw = lambda lo, m: Network.loss(lo, m, episode(), jax.random.PRNGKey(0))[0]  # unguarded
    assert not np.isfinite(jax.jit(raw, static_argnums=0)(lopt, meta))
    loss, metrics = jax.jit(lopt.loss)(meta, episode(), jax.random.PRNGKey(0))
    assert float(loss) == 7.5 and float(metrics["loss"]) == 7.5
    grads = jax.jit(jax.grad(lambda m: lopt.loss(m, episode(), jax.random.PRNGKey(0))[0]))(meta)
    assert all(bool(jnp.all(a == 0)) for a in jax.tree.leaves(grads))


@pytest.mark.slow
def test_the_guard_leaves_a_healthy_meta_gradient_alone():
    ok = MLPLOpt(**NET, meta_loss="cross_entropy")
    meta = ok.init(jax.random.PRNGKey(8), episode())
    raw = lambda lo, m: Network.loss(lo, m, episode(), jax.random.PRNGKey(0))[0]
    f = lambda m: ok.loss(m, episode(), jax.random.PRNGKey(0))[0]
    for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(f))(meta)),
                    jax.tree.leaves(jax.jit(jax.grad(lambda m: raw(ok, m)))(meta)),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_step_offsets_are_drawn_per_episode_from_the_key():
    lopt = MLPLOpt(**NET, max_offset=1000)
    meta = lopt.init(jax.random.PRNGKey(0), episode())
    offsets = {int(lopt.init_state(meta, jax.random.PRNGKey(k), 36)[2]) for k in range(6)}
    assert len(offsets) > 1 and all(0 <= o < 1000 for o in offsets)
    again = int(lopt.init_state(meta, jax.random.PRNGKey(3), 36)[2])
    assert again == int(lopt.init_state(meta, jax.random.PRNGKey(3), 36)[2])
    assert int(MLPLOpt(**NET).init_state(meta, jax.random.PRNGKey(3), 36)[2]) == 0


def test_score_steps_average_the_curve_at_those_steps():
    lopt = AdafacLOpt(**{**NET, "replicas": 2}, max_offset=50, meta_loss="cross_entropy",
                      score_steps=(7, 2, 4, 2))
    assert lopt.score_steps == (2, 4, 7)
    plain = dataclasses.replace(lopt, score_steps=())
    meta = lopt.init(jax.random.PRNGKey(1), episode())
    key = jax.random.PRNGKey(3)
    curve = plain.curve(meta, episode(), key, 7)
    loss, metrics = lopt.loss(meta, episode(), key)
    for name in ("loss", "accuracy"):
        np.testing.assert_allclose(metrics[name], np.mean(curve[name][np.array([2, 4, 7])]),
                                   rtol=1e-5)
    at_t = dataclasses.replace(lopt, score_steps=(NET["inner_steps"],)).loss(meta, episode(), key)
    np.testing.assert_allclose(at_t[0], plain.loss(meta, episode(), key)[0], rtol=1e-6)
    # evaluations score at T, as the baselines are scored
    assert lopt.for_evaluation() == plain
    assert Experiment(learner=lopt, splits={"train": sampler()}).evaluator == plain
    config = lopt_omniglot.get_config()
    config.learner.score_steps = "100,10"
    assert lopt_omniglot.build_learner(config, 5).score_steps == (10, 100)
    config.learner.score_steps = "10,x"
    with pytest.raises(ValueError, match=r"learner.score_steps='10,x': give whole numbers"):
        lopt_omniglot.build_learner(config, 5)
    with pytest.raises(ValueError, match="score_steps must list inner step counts >= 1"):
        AdafacLOpt(**NET, score_steps=(0, 3))


@pytest.mark.slow
def test_meta_training_lowers_the_query_loss():
    """20 meta-steps of the small optimizer on two-moons tasks (5 inner steps)."""
    tasks = Functions2D(families=("moons",), num_support=32, num_queries=32)
    lopt = AdafacLOpt(ways=2, hidden=(8,), inner_steps=5, step_mult=0.02,
                      meta_loss="cross_entropy")
    outer = GradientOuterLoop(learning_rate=1e-2, batch_size=8, steps_per_call=20)
    state = outer.init(lopt, tasks, jax.random.PRNGKey(0))
    held = tasks.sample_batch(jax.random.PRNGKey(99), 64)
    keys = jax.random.split(jax.random.PRNGKey(1), 64)
    query_loss = jax.jit(lambda meta: jnp.mean(jax.vmap(
        lambda e, k: lopt.loss(meta, e, k)[0])(held, keys)))
    before = float(query_loss(outer.meta_params(state)))
    state, _ = outer.compiled_steps(lopt, tasks, None)(state, 20)
    after = float(query_loss(outer.meta_params(state)))
    assert after < before - 0.1, (before, after)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="start='adam'"):
        MLPLOpt(start="adam")
    with pytest.raises(ValueError, match="hidden_size >= 2"):
        AdafacLOpt(hidden_size=1)


@needs_omniglot
@pytest.mark.slow  # trains and reports a tiny run
def test_the_report_and_evaluate_score_every_learner_on_another_dataset(tmp_path, capsys):
    """`report_dataset=sklearn:digits`: the report's curves of the rule and the tuned
    baselines on digit tasks too (their table and figure); `metalearn evaluate --dataset`
    scores the baselines beside the rule on the same digit episodes."""
    import json

    from metalearn.cli import main

    pytest.importorskip("sklearn.datasets")
    run = tmp_path / "lopt"
    sets = ["steps=2", "eval_every=0", "test_episodes=4", "report_episodes=6", "tune_episodes=4",
            "baseline_lrs=0.01,0.1", "learner.hidden=8", "learner.inner_steps=2",
            "report_horizon=2", "outer.batch_size=1", "outer.steps_per_call=2",
            "eval_batch_size=6", "report_dataset=sklearn:digits", *MINIMAL_NO_VALIDATION]
    assert main(["train", "lopt_omniglot", "--run-dir", str(run), "--no-progress",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    said = capsys.readouterr().out
    assert "sklearn_digits tasks (6), accuracy % at T=2, 4 (2T) inner steps:" in said
    summary = json.loads((run / "summary.json").read_text())
    digits = summary["dataset"]
    assert (digits["name"], digits["classes"], digits["examples"]) == ("sklearn_digits", 10, 1797)
    assert set(digits["curves"]) == set(summary["curves"]) == {"rule", "sgd", "adam"}
    for name in ("rule", "sgd", "adam"):
        assert len(digits["curves"][name]["mean"]) == 5
        assert digits["curves"][name] != summary["curves"][name]  # other tasks, other figures
    assert (run / "plots" / "accuracy_vs_steps_sklearn_digits.png").stat().st_size > 0

    assert main(["evaluate", str(run), "--dataset", "sklearn:digits", "--split", "train",
                 "--episodes", "6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dataset:sklearn_digits (step 2, 6 episodes, seed 0)" in out
    res = json.loads((run / "eval_dataset_sklearn_digits.json").read_text())
    assert set(res["baselines"]) == {
        f"{o} (lr {summary['tuning'][o]['learning_rate']:g}, tuned)" for o in ("sgd", "adam")}
    for name, metrics in res["baselines"].items():
        assert f"  {name}" in out and 0 <= metrics["accuracy"] <= 1

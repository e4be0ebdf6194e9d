"""The icl_gd experiments: comparison metrics, sampler, report and an end-to-end run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.config import apply_overrides
from metalearn.core import Episode
from metalearn.discovery import load_module
from metalearn.experiments import icl_gd
from metalearn.learners.gd import GradientDescent
from metalearn.learners.lsa import LSA, gd_construction
from metalearn.reload import evaluate_run
from metalearn.runs import Run
from metalearn.tasks.regression import LinearRegression
from metalearn.training import train

SMALL = ["task.dim=4", "task.num_context=6", "analysis.search_tasks=500",
         "test_episodes=200", "analysis.ood_tasks=100", "eval_episodes=200",
         "outer.batch_size=64", "outer.steps_per_call=10", "checkpoint_every=0"]


def test_construction_compares_perfectly_with_gd():
    gd = icl_gd.Baseline("gd", GradientDescent(), {"lr": 5.0, "gamma": 0.0})
    learner = icl_gd.Compared(LSA(), (gd,))
    meta = gd_construction(4, 1, 5.0, 6)
    task = LinearRegression(dim=4, num_context=6)
    eps = jax.jit(task.sample_batch, static_argnums=1)(jax.random.PRNGKey(0), 50)
    loss = jax.jit(jax.vmap(learner.loss, (None, 0, None)))
    _, m = loss(meta, eps, jax.random.PRNGKey(0))
    np.testing.assert_allclose(m["loss"], m["loss_gd"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m["model_cos"], 1.0, atol=1e-5)
    assert float(np.max(m["preds_diff"])) < 1e-4 and float(np.max(m["model_diff"])) < 1e-3
    assert set(m) == {"loss", "loss_gd", "preds_diff", "model_diff", "model_cos"}


def _episodes(b: int, d: int, n: int, q: int = 1, seed: int = 0) -> Episode:
    """Linear-regression episodes drawn with NumPy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.5, 0.5, (b, n + q, d)).astype(np.float32)
    y = x @ rng.normal(size=(b, d, 1)).astype(np.float32)
    return Episode(*(jnp.asarray(a) for a in (x[:, :n], y[:, :n], x[:, n:], y[:, n:])))


def test_sensitivity_is_the_implicit_linear_model():
    ep = jax.tree.map(lambda a: a[0], _episodes(1, 3, 5, q=2))
    gd = GradientDescent(steps=2, lr=0.3)
    lsa = LSA(num_layers=2)
    cons = gd_construction(3, 1, 0.3, 5, num_layers=2)

    @jax.jit
    def both(meta_gd, cons):
        sens = icl_gd.predictions_and_sensitivities(gd, meta_gd, ep, None)[1]
        sens2 = icl_gd.predictions_and_sensitivities(lsa, cons, ep, None)[1]
        return sens, sens2, gd.adapt(meta_gd, ep.support(), None)

    sens, sens2, w = both(gd.init(None, ep), cons)
    np.testing.assert_allclose(sens[0, 0], w[:, 0], rtol=1e-5)
    np.testing.assert_allclose(sens2, sens, rtol=1e-4, atol=1e-6)


def test_ood_curves_scale_the_law():
    gd = GradientDescent(steps=1, lr=1.0)
    c = icl_gd.ood_curves({"gd": (gd, gd.init(None, None))}, _episodes(50, 3, 5))
    inp, wt = c["input_scale"], c["weight_scale"]
    assert len(inp["gd"]) == len(icl_gd.INPUT_SCALES) and len(wt["gd"]) == len(wt["scale"])
    # weights scaled by b: GD is linear in y, so its loss scales by b^2
    i1, i2 = wt["scale"].index(1.0), wt["scale"].index(2.0)
    assert wt["gd"][i2] == pytest.approx(4 * wt["gd"][i1], rel=1e-4)


def _train_and_check(tmp_path, name: str) -> dict:
    run, summary = train(name, [*SMALL, "steps=20", "eval_every=10"],
                         run_dir=tmp_path / "run", progress=False)
    for k in ("loss_model", "loss_gd", "model_cos", "preds_diff", "loss_interp", "table", "ood"):
        assert k in summary, k
    assert "| loss, trained model |" in summary["table"]
    assert (run.path / "plots" / "icl_gd.png").exists()
    evals = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert evals and "model_cos" in evals[0] and "loss_gd" in evals[0]
    assert summary["gd_step_sizes"]["lr"] > 1
    return summary


def test_train_end_to_end(tmp_path, monkeypatch):
    summary = _train_and_check(tmp_path, "icl_gd")
    # one test figure: the table's model loss is the test split's loss, which `evaluate` repeats
    assert summary["loss_model"] == summary["test"]["loss"]
    assert (tmp_path / "run" / icl_gd.BASELINES_FILE).exists()

    def refit(*args, **kw):
        raise AssertionError("evaluate must reuse the run's fitted baselines")

    monkeypatch.setattr(icl_gd, "fit_step_sizes", refit)
    res = evaluate_run(tmp_path / "run")
    assert res["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-6)
    assert res["loss_gd"] == pytest.approx(summary["test"]["loss_gd"], rel=1e-6)


@pytest.mark.slow
def test_train_end_to_end_recurrent(tmp_path):
    summary = _train_and_check(tmp_path, "icl_gd_recurrent")
    assert "loss_gdpp" in summary and "model_cos_gdpp" in summary
    assert summary["loss_gdpp"] < summary["loss_gd"]


def test_build_trains_the_plain_learner_and_evaluates_the_comparison():
    c = icl_gd.get_config()
    c.experiment = "icl_gd"
    apply_overrides(c, SMALL)
    exp = icl_gd.build(c)
    assert isinstance(exp.learner, LSA) and isinstance(exp.eval_learner, icl_gd.Compared)
    assert [b.name for b in exp.eval_learner.baselines] == ["gd", "lstsq"]


def test_evolution_starts_where_the_gradient_run_starts():
    from metalearn.outer.evolution import EvolutionOuterLoop
    from metalearn.outer.gradient import GradientOuterLoop

    task = LinearRegression(dim=3, num_context=5)
    key = jax.random.PRNGKey(3)
    g = GradientOuterLoop(batch_size=4).init(LSA(), task, key)
    e = EvolutionOuterLoop(population_size=4, batch_size=4)
    np.testing.assert_array_equal(g.params["attn"]["query"],
                                  e.meta_params(e.init(LSA(), task, key))["attn"]["query"])


def test_sibling_experiments():
    want = {"icl_gd_recurrent": ("model.num_layers", 2), "icl_gd_softmax": ("model.softmax", True),
            "icl_gd_es": ("outer.kind", "evolution"),
            "icl_gd_nonlinear": ("model.embed_size", 40)}
    for name, (field, value) in want.items():
        mod = load_module(name)
        section, leaf = field.split(".")
        assert mod.get_config()[section][leaf] == value
        assert mod.build is icl_gd.build or name == "icl_gd_nonlinear"


@pytest.mark.slow  # trains the baseline
def test_nonlinear_baseline_is_trained_once(tmp_path):
    mod = load_module("icl_gd_nonlinear")
    c = mod.get_config()
    c.experiment = "icl_gd_nonlinear"
    apply_overrides(c, ["analysis.baseline_steps=4", "model.embed_size=8", "outer.batch_size=16",
                        "outer.steps_per_call=4"])
    run = Run(tmp_path)
    first = mod.build(c, run).eval_learner.baselines[0]
    assert first.name == "mlp_gd" and first.learner.gd_attention
    assert (tmp_path / mod.BASELINE_FILE).exists()
    again = mod.build(c, run).eval_learner.baselines[0]
    np.testing.assert_allclose(again.meta["embed"]["w1"], first.meta["embed"]["w1"], rtol=1e-6)
    for meta in (first.meta, again.meta):  # arrays, as the learner needs them, both times
        w1 = meta["embed"]["w1"]
        assert isinstance(w1, jax.Array) and w1.ndim == 2 and w1.dtype == jnp.float32

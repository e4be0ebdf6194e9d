"""The icl_gd experiments: comparison metrics, sampler, report and an end-to-end run."""

import json

import jax
import numpy as np
import pytest

from metalearn.experiment import load_module, train
from metalearn.experiments import icl_gd
from metalearn.learners.gd import GradientDescent
from metalearn.learners.lsa import LSA, gd_construction
from metalearn.tasks.regression import LinearRegression

SMALL = ["task.dim=4", "task.num_context=6", "analysis.search_tasks=1000",
         "analysis.test_tasks=500", "analysis.ood_tasks=100", "eval_episodes=200",
         "outer.batch_size=64", "outer.steps_per_call=10", "checkpoint_every=0"]


def test_flat_sampler_has_the_same_law():
    flat = icl_gd.FlatLinearRegression(dim=3, num_context=20, input_range=0.5)
    ref = LinearRegression(dim=3, num_context=20, input_range=0.5)
    a = flat.sample_batch(jax.random.PRNGKey(0), 4000)
    b = ref.sample_batch(jax.random.PRNGKey(1), 4000)
    assert a.support_x.shape == b.support_x.shape and a.query_y.shape == b.query_y.shape
    for f in ("support_x", "support_y"):
        x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        assert abs(x.std() - y.std()) < 0.02 * y.std()
        assert np.abs(x).max() <= 0.5 + 1e-6 or f == "support_y"
    w = np.linalg.lstsq(np.asarray(a.support_x[0]), np.asarray(a.support_y[0]), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(a.query_x[0]) @ w, a.query_y[0], atol=1e-4)


def test_construction_compares_perfectly_with_gd():
    gd = icl_gd.Baseline("gd", GradientDescent(), {"lr": 5.0, "gamma": 0.0})
    learner = icl_gd.Compared(LSA(), (gd,))
    meta = gd_construction(4, 1, 5.0, 6)
    task = icl_gd.FlatLinearRegression(dim=4, num_context=6)
    eps = icl_gd.Probed(task).sample_batch(jax.random.PRNGKey(0), 50)
    loss = jax.jit(jax.vmap(learner.loss, (None, 0, None)))
    _, m = loss(meta, eps, jax.random.PRNGKey(0))
    np.testing.assert_allclose(m["loss"], m["loss_gd"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(m["model_cos"], 1.0, atol=1e-5)
    assert float(np.max(m["preds_diff"])) < 1e-4 and float(np.max(m["model_diff"])) < 1e-3
    # unmarked (training) episodes only get the plain loss
    _, m = loss(meta, task.sample_batch(jax.random.PRNGKey(0), 2), jax.random.PRNGKey(0))
    assert set(m) == {"loss"}


def test_sensitivity_is_the_implicit_linear_model():
    ep = LinearRegression(dim=3, num_context=5, num_queries=2).sample(jax.random.PRNGKey(0))
    gd = GradientDescent(steps=2, lr=0.3)
    meta = gd.init(None, ep)
    _, sens = icl_gd.predictions_and_sensitivities(gd, meta, ep, None)
    w = gd.adapt(meta, ep.support(), None)
    np.testing.assert_allclose(sens[0, 0], w[:, 0], rtol=1e-5)
    lsa = LSA(num_layers=2)
    cons = gd_construction(3, 1, 0.3, 5, num_layers=2)
    _, sens2 = icl_gd.predictions_and_sensitivities(lsa, cons, ep, None)
    np.testing.assert_allclose(sens2, sens, rtol=1e-4, atol=1e-6)


def test_ood_curves_scale_the_law():
    task = LinearRegression(dim=3, num_context=5)
    gd = GradientDescent(steps=1, lr=1.0)
    c = icl_gd.ood_curves({"gd": (gd, gd.init(None, None))},
                          task.sample_batch(jax.random.PRNGKey(0), 50))
    inp, wt = c["input_scale"], c["weight_scale"]
    assert len(inp["gd"]) == len(icl_gd.INPUT_SCALES) and len(wt["gd"]) == len(wt["scale"])
    # weights scaled by b: GD is linear in y, so its loss scales by b^2
    i1, i2 = wt["scale"].index(1.0), wt["scale"].index(2.0)
    assert wt["gd"][i2] == pytest.approx(4 * wt["gd"][i1], rel=1e-4)


def test_train_end_to_end(tmp_path):
    run, summary = train("icl_gd_recurrent", [*SMALL, "steps=20", "eval_every=10"],
                         run_dir=tmp_path / "run", progress=False)
    for k in ("loss_model", "loss_gd", "model_cos", "preds_diff", "loss_interp", "table", "ood"):
        assert k in summary, k
    assert "| loss, trained model |" in summary["table"]
    assert (run.path / "plots" / "icl_gd.png").exists()
    evals = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["split"] == "eval"]
    assert evals and "model_cos" in evals[0] and "loss_gd" in evals[0]
    assert "loss_gdpp" in summary and "model_cos_gdpp" in summary
    assert summary["loss_gdpp"] < summary["loss_gd"] and summary["gd_step_sizes"]["lr"] > 1


def test_sibling_experiments():
    want = {"icl_gd_recurrent": ("model.num_layers", 2), "icl_gd_softmax": ("model.softmax", True),
            "icl_gd_es": ("outer.kind", "evolution")}
    for name, (field, value) in want.items():
        mod = load_module(name)
        section, leaf = field.split(".")
        assert mod.get_config()[section][leaf] == value
        assert mod.build is icl_gd.build

"""Transformers learn in context by GD: sine regression, MLP embedding + 1 LSA layer vs MLP + GD.

The paper's non-linear regression: y = a sin(x + phi), a ~ U(0.1, 0.5), phi ~ U(0, pi),
x ~ U(-5, 5), N = 10 context points. The learner embeds x with an MLP, phi(x) = z + W2 gelu(W1 z)
with z = W_e x (width 40, hidden 160), and runs one LSA layer on the tokens (phi(x_i), y_i).
The baseline, "MLP + GD", is the same embedding followed by the fixed GD construction (only the
embedding and the learning rate are learned): gradient descent on learned features. It is
meta-trained first, for `analysis.baseline_steps` steps with the same optimizer, and cached in
the run directory (`baseline_mlp_gd.json`) so that evaluating or resuming the run reuses it.
The report compares the two on test tasks with 10 queries each: losses, prediction distance and
the cosine of their sensitivity curves d y_hat / d x_q over the queries.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import MetaParams
from metalearn.evaluation import batch_sampler, format_value
from metalearn.experiment import ConfigDict, Experiment, cached_json
from metalearn.experiments import icl_gd
from metalearn.learners.lsa import LSA
from metalearn.outer.driver import RunOptions
from metalearn.outer.registry import build_outer
from metalearn.runs import Run
from metalearn.seeds import BASELINE_OFFSET
from metalearn.tasks.regression import Sinusoid

BASELINE_FILE = "baseline_mlp_gd.json"
# The paper's code on a 2-core CPU (seed 0, batch 2048; the Transformer stopped at 4000 of its
# 20,000 steps, MLP + GD trained for 20,000 steps; 2048 test tasks with one query each).
REFERENCE = {"loss_model": 0.00166, "loss_mlp_gd": 0.00198, "model_cos": 0.916,
             "preds_diff": 0.024, "loss_zero": 0.0265}


def get_config() -> ConfigDict:
    """Sine waves, N = 10; MLP (40, 160) + 1 LSA layer; batch 512, 4000 steps."""
    c = icl_gd.get_config()
    c.steps = 4000
    c.eval_every = 250
    c.eval_episodes = 1000
    c.task = ConfigDict({"num_context": 10, "num_queries": 1, "input_range": 5.0,
                         "amplitude_min": 0.1, "amplitude_max": 0.5,
                         "phase_min": -math.pi, "phase_max": 0.0})
    c.model.embed_size = 40
    c.model.mlp_widening = 4
    c.test_episodes = 2048
    c.analysis = ConfigDict({"baseline_steps": 4000, "test_queries": 10})
    c.outer.batch_size = 512
    c.outer.gradient.clip_norm = 100.0
    c.outer.steps_per_call = 50
    return c


QUICK = {"analysis.baseline_steps": 20}  # `--quick`: the MLP + GD baseline trained briefly too

DOCS = {
    "task.num_context": "context points (x_i, y_i) per task, N",
    "task.num_queries": "query points per training task",
    "task.input_range": "inputs x ~ U(-r, r)",
    "task.amplitude_min": "amplitude a ~ U(min, max)",
    "task.amplitude_max": "amplitude a ~ U(min, max)",
    "task.phase_min": "phase phi ~ U(min, max)",
    "task.phase_max": "phase phi ~ U(min, max)",
    "model.embed_size": "width of the MLP embedding of x",
    "model.mlp_widening": "hidden width of the embedding MLP / embed_size",
    "analysis.baseline_steps": "meta-steps of the MLP + GD baseline (trained once per run)",
    "analysis.test_queries": "query points per test task (the sensitivity curves' points)",
}
DOCS = {**icl_gd.DOCS, **DOCS}


def train_baseline(config: ConfigDict, learner: LSA, task: Sinusoid,
                   run: Run | None = None) -> MetaParams:
    """Meta-train "MLP + GD" once per run (kept in the run directory as BASELINE_FILE)."""
    def fit() -> dict:
        steps = config.analysis.baseline_steps
        res = build_outer(config.outer, steps).run(
            learner, task, jax.random.PRNGKey(config.seed + BASELINE_OFFSET), steps=steps,
            options=RunOptions(progress=False))
        losses = [r["loss"] for r in res.history if r.get("split") == "train"]
        return {"steps": steps, "meta": jax.tree.map(lambda a: np.asarray(a).tolist(), res.meta),
                "final_train_loss": float(np.mean(losses[-50:]))}

    saved = cached_json(run, BASELINE_FILE, fit)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), saved["meta"],
                        is_leaf=lambda x: isinstance(x, list))  # a JSON list is one array


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """LSA with the MLP embedding, compared with the (pre-trained) MLP + GD baseline."""
    task = Sinusoid(**config.task.to_dict())
    lsa = LSA(**config.model.to_dict())
    mlp_gd = dataclasses.replace(lsa, gd_attention=True)
    baseline = icl_gd.Baseline("mlp_gd", mlp_gd, train_baseline(config, mlp_gd, task, run))
    test = dataclasses.replace(task, num_queries=config.analysis.test_queries)
    return Experiment(learner=lsa, splits={"train": task, "test": test},
                      eval_learner=icl_gd.Compared(lsa, (baseline,)),
                      report=report)


def _fits(exp: Experiment, meta: MetaParams, key: jax.Array, tasks: int = 3):
    """A plot callback: the two models' prediction curves on a few test tasks."""
    learner: icl_gd.Compared = exp.eval_learner  # type: ignore[assignment]
    base = learner.baselines[0]
    grid = jnp.linspace(-5, 5, 200)[:, None]
    eps = batch_sampler(exp.splits["test"], tasks)(key)

    def draw(ax) -> None:
        for i in range(tasks):
            ep = jax.tree.map(lambda a, i=i: a[i], eps)
            for lrn, m, style, name in ((learner.learner, meta, "-", "trained model"),
                                        (base.learner, base.meta, "--", "MLP + GD")):
                y = lrn.predict(m, lrn.adapt(m, ep.support(), None), grid)
                ax.plot(grid[:, 0], y.reshape(-1), style, color=f"C{i}", lw=1.2,
                        label=name if i == 0 else None)
            ax.plot(ep.support_x[:, 0], ep.support_y[:, 0], "o", color=f"C{i}", ms=4)
        ax.set(title="test tasks: context (dots) and predictions", xlabel="x")

    return draw


def report(exp: Experiment, meta: MetaParams, run: Run | None, config: ConfigDict,
           progress: bool = False) -> dict:
    """Losses, prediction distance and sensitivity cosine against MLP + GD; table and plot."""
    s, eps = icl_gd.report_comparison(config, exp, meta, progress)
    s["loss_zero"] = float(0.5 * jnp.mean(eps.query_y ** 2))
    rows = [("loss, trained model (MLP + 1 LSA layer)", "loss_model"),
            ("loss, MLP + GD", "loss_mlp_gd"), ("loss, zero predictor", "loss_zero"),
            ("model cos vs MLP + GD (d y/d x_q over the queries)", "model_cos"),
            ("preds diff vs MLP + GD (mean L2)", "preds_diff"),
            ("model diff vs MLP + GD", "model_diff")]
    lines = ["| quantity | this run | official code |", "|---|---|---|"]
    for label, k in rows:
        if k in s:
            lines.append(f"| {label} | {format_value(s[k], s.get(k + '_ci95'))} | "
                         f"{format_value(REFERENCE.get(k))} |")
    s["table"] = "\n".join(lines)
    if run is not None:
        extra = _fits(exp, meta, jax.random.PRNGKey(3))
        s["plot"] = str(icl_gd.plot_run(run, ["mlp_gd"], extra=extra,
                                        name="icl_gd_nonlinear.png"))
    return s

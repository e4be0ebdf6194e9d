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
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import MetaParams
from metalearn.experiment import ConfigDict, Experiment, build_outer
from metalearn.experiments import icl_gd
from metalearn.learners.lsa import LSA
from metalearn.outer.base import RunOptions
from metalearn.runs import Run
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
    c.analysis = ConfigDict({"baseline_steps": 4000, "test_tasks": 2048, "test_queries": 10})
    c.outer.batch_size = 512
    c.outer.clip_norm = 100.0
    c.outer.steps_per_call = 50
    return c


def _to_json(tree: Any) -> Any:
    return jax.tree.map(lambda a: np.asarray(a).tolist(), tree)


def train_baseline(config: ConfigDict, learner: LSA, task: Sinusoid,
                   run: Run | None = None) -> MetaParams:
    """Meta-train "MLP + GD" (or read it from the run directory when it was trained before)."""
    if run is not None and (run.path / BASELINE_FILE).exists():
        saved = run.read_json(BASELINE_FILE)
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), saved["meta"])
    steps = config.analysis.baseline_steps
    outer = build_outer(config.outer, steps)
    res = outer.run(learner, task, jax.random.PRNGKey(config.seed + 11), steps=steps,
                    options=RunOptions(progress=False))
    if run is not None:
        losses = [r["loss"] for r in res.history if r.get("split") == "train"]
        run.write_json(BASELINE_FILE, {"steps": steps, "meta": _to_json(res.meta),
                                       "final_train_loss": float(np.mean(losses[-50:]))})
    return res.meta


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """LSA with the MLP embedding, compared with the (pre-trained) MLP + GD baseline."""
    task = Sinusoid(**config.task.to_dict())
    lsa = LSA(**config.model.to_dict())
    mlp_gd = dataclasses.replace(lsa, gd_attention=True)
    baseline = icl_gd.Baseline("mlp_gd", mlp_gd, train_baseline(config, mlp_gd, task, run))
    test = dataclasses.replace(task, num_queries=config.analysis.test_queries)
    return Experiment(learner=lsa, splits={"train": task, "test": test},
                      eval_learner=icl_gd.Compared(lsa, (baseline,)),
                      report=functools.partial(report, config=config))


def _fits(exp: Experiment, meta: MetaParams, key: jax.Array, tasks: int = 3):
    """A plot callback: the two models' prediction curves on a few test tasks."""
    learner: icl_gd.Compared = exp.eval_learner  # type: ignore[assignment]
    base = learner.baselines[0]
    grid = jnp.linspace(-5, 5, 200)[:, None]
    eps = jax.jit(exp.splits["test"].sample_batch, static_argnums=1)(key, tasks)

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


def report(exp: Experiment, meta: MetaParams, run: Run | None,
           config: ConfigDict | None = None) -> dict:
    """Losses, prediction distance and sensitivity cosine against MLP + GD; table and plot."""
    config = config if config is not None else get_config()
    eps = icl_gd.test_episodes(exp.splits["test"], config.analysis.test_tasks)
    s = icl_gd.test_comparison(exp.eval_learner, meta, eps)
    s["loss_zero"] = float(0.5 * jnp.mean(eps.query_y ** 2))
    rows = [("loss, trained model (MLP + 1 LSA layer)", "loss_model"),
            ("loss, MLP + GD", "loss_mlp_gd"), ("loss, zero predictor", "loss_zero"),
            ("model cos vs MLP + GD (d y/d x_q over the queries)", "model_cos"),
            ("preds diff vs MLP + GD (mean L2)", "preds_diff"),
            ("model diff vs MLP + GD", "model_diff")]
    lines = ["| quantity | this run | official code |", "|---|---|---|"]
    for label, k in rows:
        if k in s:
            ref = icl_gd._fmt(REFERENCE.get(k))
            lines.append(f"| {label} | {icl_gd._fmt(s[k], s.get(k + '_ci95'))} | {ref} |")
    s["table"] = "\n".join(lines)
    if run is not None:
        extra = _fits(exp, meta, jax.random.PRNGKey(3))
        s["plot"] = str(icl_gd.plot_run(run, ["mlp_gd"], extra=extra,
                                        name="icl_gd_nonlinear.png"))
    return s

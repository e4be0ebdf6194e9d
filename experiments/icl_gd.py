"""Transformers learn in context by gradient descent: 1-layer LSA vs GD (von Oswald et al. 2023).

A linear self-attention learner (`metalearn.learners.lsa.LSA`) is meta-trained on linear
regression, d = 10, N = 10, one query per task, x ~ U(-0.5, 0.5)^d (the released code's law;
`task.input_range` is the half-width), W ~ N(0, I). The report compares it with gradient descent
(learning rate line-searched on training tasks), GD++ (for several layers) and least squares on
10,000 fresh test tasks: losses, the L2 distance of predictions (`preds_diff`), the cosine of
the sensitivities d y_hat / d x_q (`model_cos`), the loss of the trained weights interpolated
with the construction, and losses on rescaled (out-of-distribution) inputs and weights.

Training curves of these metrics come from the periodic evaluation (`eval_every`, on
`eval_episodes` test tasks): the experiment's `eval_learner` (`Compared`) scores evaluations with
the comparison metrics, while training steps run the plain LSA and pay nothing for them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import Array, Episode, InnerLearner, MetaParams, TaskSampler, Wrapper
from metalearn.evaluation import (
    episode_metrics,
    evaluate_episodes,
    format_value,
    sample_episodes,
)
from metalearn.experiment import ConfigDict, Experiment, base_config, cached_json, outer_config
from metalearn.learners.gd import GradientDescent, LeastSquares, fit_step_sizes
from metalearn.learners.lsa import (
    LSA,
    effective_step,
    gd_construction_for,
    interpolate_with_construction,
)
from metalearn.runs import Run
from metalearn.seeds import GD_SEARCH_OFFSET, TEST_SEED
from metalearn.tasks.regression import LinearRegression
from metalearn.training import evaluate_split

# Figures of the paper's official code re-run on a 2-core CPU (x ~ U(-0.5, 0.5)^10, N = 10,
# 5000 steps, 10,000 validation tasks), keyed by (layers, recurrent, heads, softmax, layer_norm).
REFERENCE = {
    (1, True, 1, False, False): {"loss_model": 0.2079, "loss_gd": 0.2074, "loss_gdpp": 0.2074,
                                 "loss_interp": 0.2075, "model_cos": 0.9993,
                                 "preds_diff": 0.0225, "model_diff": 0.097,
                                 "ood_input_1.5": (1.18, 1.09), "ood_input_2": (8.97, 8.31)},
    (2, True, 1, False, False): {"loss_model": 0.1136, "loss_gd": 0.1588, "loss_gdpp": 0.1116,
                                 "loss_interp": 0.1121, "model_cos": 0.952,
                                 "model_cos_gdpp": 0.9974},
    (3, True, 1, False, False): {"loss_model": 0.0816, "loss_gd": 0.1341, "loss_gdpp": 0.0787,
                                 "loss_interp": 0.0789, "model_cos": 0.963,
                                 "model_cos_gdpp": 0.9951},
    (1, True, 2, True, False): {"loss_model": 0.2201, "loss_gd": 0.2074, "model_cos": 0.9646,
                                "preds_diff": 0.1057},
    (1, True, 1, True, False): {"loss_model": 0.2906, "loss_gd": 0.2074, "model_cos": 0.720},
    (1, True, 1, False, True): {"loss_model": 0.2587, "loss_gd": 0.2074, "model_cos": 0.833},
}
INPUT_SCALES = tuple(np.round(np.arange(0.5, 2.01, 0.1), 2).tolist())
WEIGHT_SCALES = tuple(np.round(np.arange(0.5, 5.01, 0.5), 2).tolist())


def get_config() -> ConfigDict:
    """d = N = 10, 1-layer LSA, Adam(W) lr 1e-3 b2 = 0.98, batch 2048, 5000 steps."""
    c = base_config(steps=5000, eval_every=100, eval_episodes=2000, test_episodes=10_000,
                    checkpoint_every=1000)
    c.task = ConfigDict({"dim": 10, "num_context": 10, "input_range": 0.5, "weight_scale": 1.0,
                         "num_queries": 1})
    c.model = ConfigDict({"num_layers": 1, "recurrent": True, "num_heads": 1, "key_size": 0,
                          "softmax": False, "layer_norm": False, "init_scale": 0.002})
    c.analysis = ConfigDict({"search_tasks": 10_000, "ood_tasks": 1000, "gd_plus_plus": True})
    c.outer = outer_config("gradient",
                           gradient={"optimizer": "adamw", "learning_rate": 1e-3, "b1": 0.9,
                                     "b2": 0.98, "clip_norm": 0.001},
                           evolution={"strategy": "Sep_CMA_ES", "population_size": 64,
                                      "std_init": 0.05},
                           batch_size=2048, steps_per_call=100)
    return c


DOCS = {
    "task.dim": "input dimension d",
    "task.num_context": "context points (x_i, y_i) per task, N",
    "task.input_range": "inputs x ~ U(-r, r)^d",
    "task.weight_scale": "teacher weights W ~ N(0, s^2 I)",
    "task.num_queries": "query points per task",
    "model.num_layers": "self-attention layers",
    "model.recurrent": "one layer's weights shared by every layer",
    "model.num_heads": "attention heads",
    "model.key_size": "key/query size per head (0: the token size)",
    "model.softmax": "softmax attention instead of linear",
    "model.layer_norm": "layer norm before attention",
    "model.init_scale": "standard deviation of the initial weights",
    "analysis.search_tasks": "training tasks the GD / GD++ step sizes are line-searched on",
    "analysis.ood_tasks": "test tasks of the out-of-distribution curves",
    "analysis.gd_plus_plus": "also compare with GD++ when there are several layers",
}


# ---------------------------------------------------------------- comparison with baselines


def predictions_and_sensitivities(learner: InnerLearner, meta: MetaParams, episode: Episode,
                                  key: Array) -> tuple[Array, Array]:
    """Query predictions [Q, dy] and their input sensitivities d y_hat / d x_q [Q, dy, d]."""
    state = learner.adapt(meta, episode.support(), key)

    def one(xq: Array) -> Array:
        return learner.predict(meta, state, xq[None]).reshape(-1)

    return jax.vmap(one)(episode.query_x), jax.vmap(jax.jacfwd(one))(episode.query_x)


def _cos(a: Array, b: Array) -> Array:
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.sum(a * b, axis=-1) / jnp.maximum(den, 1e-12)


@dataclasses.dataclass(frozen=True, eq=False)
class Baseline:
    """A fixed in-context learner to compare with: name, learner, its meta-parameters."""

    name: str
    learner: InnerLearner
    meta: dict
    align: bool = True  # also report preds_diff / model_diff / model_cos against it


@dataclasses.dataclass(frozen=True, eq=False)
class Compared(Wrapper):
    """`learner`, whose `loss` also compares it with fixed baselines (for evaluations).

    Per episode, for each baseline b: loss_b, and when b.align: preds_diff_b = ||y_hat - y_hat_b||
    and model_diff_b = ||J - J_b|| (means over queries), and model_cos_b = cos(J, J_b) with
    J = d y_hat / d x_q of all the episode's queries (one query for linear tasks: the cosine of
    the implicit linear models). The first baseline's names drop the suffix (preds_diff, ...).
    """

    learner: InnerLearner
    baselines: tuple[Baseline, ...] = ()

    def loss(self, meta: MetaParams, episode: Episode, key: Array) -> tuple[Array, dict]:
        """The wrapped learner's loss and metrics, plus the comparison metrics."""
        loss, metrics = self.learner.loss(meta, episode, key)
        return loss, {**metrics, **self.compare(meta, episode, key)}

    def compare(self, meta: MetaParams, episode: Episode, key: Array) -> dict:
        """Per-episode comparison metrics against every baseline."""
        pred, sens = predictions_and_sensitivities(self.learner, meta, episode, key)
        y = episode.query_y.reshape(pred.shape)
        out = {}
        for i, b in enumerate(self.baselines):
            bmeta = jax.tree.map(jnp.asarray, b.meta)
            p_b, s_b = predictions_and_sensitivities(b.learner, bmeta, episode, key)
            out[f"loss_{b.name}"] = 0.5 * jnp.mean(jnp.sum((p_b - y) ** 2, axis=-1))
            if b.align:
                sfx = "" if i == 0 else f"_{b.name}"
                out["preds_diff" + sfx] = jnp.mean(jnp.linalg.norm(pred - p_b, axis=-1))
                out["model_diff" + sfx] = jnp.mean(jnp.linalg.norm(
                    (sens - s_b).reshape(sens.shape[0], -1), axis=-1))
                out["model_cos" + sfx] = _cos(sens.reshape(1, -1), s_b.reshape(1, -1))[0]
        return out


# ---------------------------------------------------------------- build


def make_task(config: ConfigDict, **changes: Any) -> LinearRegression:
    """The linear-regression task law of the config."""
    t = config.task
    kw = {"dim": t.dim, "num_context": t.num_context, "num_queries": t.num_queries,
          "input_range": t.input_range, "weight_scale": t.weight_scale, **changes}
    return LinearRegression(**kw)


def make_lsa(config: ConfigDict) -> LSA:
    """The LSA learner of the config."""
    return LSA(**config.model.to_dict())


BASELINES_FILE = "baselines_gd.json"


def linear_baselines(config: ConfigDict, task: TaskSampler, steps: int,
                     run: Run | None = None) -> tuple[Baseline, ...]:
    """GD (line-searched lr), GD++ with `steps` steps (when steps > 1) and least squares.

    The step sizes are fitted once per run and kept in its directory (`BASELINES_FILE`)."""
    gd, gdpp = GradientDescent(steps=steps), GradientDescent(steps=steps, plus_plus=True)
    use_gdpp = steps > 1 and config.analysis.gd_plus_plus

    def fit() -> dict:
        key, n = jax.random.PRNGKey(config.seed + GD_SEARCH_OFFSET), config.analysis.search_tasks
        fitted = {"gd": fit_step_sizes(gd, task, key, n)[0]}
        if use_gdpp:
            fitted["gdpp"] = fit_step_sizes(gdpp, task, key, n)[0]
        return jax.tree.map(lambda v: np.asarray(v).tolist(), fitted)

    sizes = cached_json(run, BASELINES_FILE, fit)
    out = [Baseline("gd", gd, sizes["gd"])]
    if use_gdpp:
        out.append(Baseline("gdpp", gdpp, sizes["gdpp"]))
    out.append(Baseline("lstsq", LeastSquares(), {}, align=False))
    return tuple(out)


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """LSA learner compared with line-searched GD (GD++ too with several layers), and samplers."""
    task = make_task(config)
    lsa = make_lsa(config)
    compared = Compared(lsa, linear_baselines(config, task, lsa.num_layers, run))
    return Experiment(learner=lsa, splits={"train": task, "test": task},
                      eval_learner=compared, report=report)


# ---------------------------------------------------------------- report


def ood_curves(learners: dict[str, tuple[InnerLearner, MetaParams]],
               eps: Episode) -> dict[str, dict[str, list[float]]]:
    """Mean loss of each learner on the episodes `eps` with inputs (and so targets) scaled by
    alpha or the teacher weights by beta: x -> alpha x, y -> alpha y is exactly the law
    U(-alpha a, alpha a) of the rescaled input range."""
    k = jax.random.PRNGKey(0)

    def scaled(ex: float, ey: float) -> Episode:
        return eps._replace(support_x=ex * eps.support_x, query_x=ex * eps.query_x,
                            support_y=ey * eps.support_y, query_y=ey * eps.query_y)

    out: dict[str, dict[str, list[float]]] = {"input_scale": {"scale": list(INPUT_SCALES)},
                                               "weight_scale": {"scale": list(WEIGHT_SCALES)}}
    for name, (lrn, meta) in learners.items():
        def loss(e: Episode, lrn=lrn, meta=meta) -> float:
            return float(np.mean(episode_metrics(lrn, meta, e, k)["loss"]))

        out["input_scale"][name] = [loss(scaled(a, a)) for a in INPUT_SCALES]
        out["weight_scale"][name] = [loss(scaled(1.0, b)) for b in WEIGHT_SCALES]
    return out


def _reference_key(config: ConfigDict) -> tuple:
    m, t = config.model, config.task
    if (t.dim, t.num_context, t.input_range, t.weight_scale) != (10, 10, 0.5, 1.0):
        return ()
    return (m.num_layers, m.recurrent, m.num_heads, m.softmax, m.layer_norm)


def construction_metrics(lsa: LSA, meta: MetaParams, gd: Baseline,
                         eps: Episode) -> dict[str, float]:
    """Losses of the trained weights interpolated with (and projected onto) the construction,
    and the step sizes the trained weights implement (1-head linear attention only)."""
    if lsa.softmax or lsa.layer_norm or lsa.num_heads != 1 or lsa.embed_size:
        return {}
    example = jax.tree.map(lambda a: a[0], eps)
    n, d = example.support_x.shape
    cons = gd_construction_for(lsa, example, gd.meta["lr"], gd.meta["gamma"])
    steps = effective_step(meta, n, d)
    proj = gd_construction_for(lsa, example, steps["eta"], steps["gamma"])
    plain = dataclasses.replace(lsa, key_size=0)
    out = {"eta_learned": np.asarray(steps["eta"]).tolist(),
           "gamma_learned": np.asarray(steps["gamma"]).tolist()}
    for name, m in (("loss_interp", interpolate_with_construction(meta, cons, d)),
                    ("loss_projected", proj), ("loss_construction", cons)):
        out[name] = evaluate_episodes(plain, m, eps, jax.random.PRNGKey(0), 1000)["loss"]
    return out


def comparison_table(s: dict, ref: dict, baselines: tuple[Baseline, ...], steps: int) -> str:
    """Markdown table: this run's figures next to the official code's (when known)."""
    names = {b.name: b for b in baselines}
    rows = [("loss, trained model", "loss_model")]
    if "gd" in names:
        eta = float(names["gd"].meta["lr"])
        rows.append((f"loss, GD ({steps} step{'s' * (steps > 1)}, eta* = {eta:.2f})", "loss_gd"))
    if "gdpp" in names:
        m = names["gdpp"].meta
        rows.append((f"loss, GD++ (eta = {float(m['lr']):.2f}, gamma = {float(m['gamma']):.2f})",
                     "loss_gdpp"))
    rows += [("loss, least squares", "loss_lstsq"),
             ("loss, trained weights interpolated with the construction", "loss_interp"),
             ("loss, construction with the learned step sizes", "loss_projected"),
             ("model cos vs GD", "model_cos"), ("model cos vs GD++", "model_cos_gdpp"),
             ("preds diff vs GD (mean L2)", "preds_diff"),
             ("preds diff vs GD++", "preds_diff_gdpp"),
             ("model diff vs GD (mean L2 of d y/d x_q)", "model_diff"),
             ("learned eta (effective step)", "eta_learned")]
    if "gdpp" in names:
        rows.append(("learned gamma (effective GD++ input step)", "gamma_learned"))
    vs = " / ".join(NAMES[b.name] for b in baselines if b.align)
    rows += [(f"OOD inputs x1.5: loss model / {vs}", "ood_input_1.5"),
             (f"OOD inputs x2: loss model / {vs}", "ood_input_2")]
    lines = ["| quantity | this run | official code |", "|---|---|---|"]
    for label, k in rows:
        if k in s:
            lines.append(f"| {label} | {format_value(s[k], s.get(k + '_ci95'))} | "
                         f"{format_value(ref.get(k))} |")
    return "\n".join(lines)


NAMES = {"gd": "GD", "gdpp": "GD++", "mlp_gd": "MLP + GD", "lstsq": "least squares",
         "model": "trained model"}


def plot_run(run: Run, baselines: Sequence[str], curves: dict | None = None,
             extra: Callable[[Any], None] | None = None, name: str = "icl_gd.png") -> Path:
    """One figure: training curves of the comparison metrics (from the periodic evaluations),
    then the OOD curves (when given) and an `extra` panel drawn by a callback (when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in run.metrics() if r.get("split") == "eval"]
    sfx = {b: "" if i == 0 else f"_{b}" for i, b in enumerate(baselines)}
    panels = [("test loss", [("loss", "trained model")] +
               [(f"loss_{b}", NAMES.get(b, b)) for b in baselines if b != "lstsq"]),
              ("model cos (d y/d x_q)", [(f"model_cos{x}", f"vs {NAMES.get(b, b)}")
                                         for b, x in sfx.items()]),
              ("preds diff (L2)", [(f"preds_diff{x}", f"vs {NAMES.get(b, b)}")
                                   for b, x in sfx.items()])]
    n = 3 + (2 if curves else 0) + (1 if extra else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6))
    for ax, (title, keys) in zip(axes[:3], panels, strict=True):
        for k, label in keys:
            pts = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), int | float)]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label, lw=1.2)
        ax.set(title=title, xlabel="meta-step")
    for ax, kind in zip(axes[3:5] if curves else (), ("input_scale", "weight_scale"),
                        strict=False):
        c = curves[kind]
        for k, v in c.items():
            if k != "scale":
                ax.plot(c["scale"], v, marker="o", ms=3, label=NAMES.get(k, k), lw=1.2)
        ax.set(title=f"out of distribution: {kind.replace('_', ' ')}", yscale="log",
               xlabel="factor on the inputs" if kind == "input_scale" else
               "factor on the teacher weights")
    if extra:
        extra(axes[-1])
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = run.path / "plots" / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_comparison(config: ConfigDict, exp: Experiment, meta: MetaParams,
                      progress: bool = False) -> tuple[dict[str, Any], Episode]:
    """The comparison metrics on the run's test episodes (those of its `test` figures, so the
    model's loss, renamed loss_model, is the test loss) and those episodes."""
    res = evaluate_split(config, exp, meta, progress="report" if progress else None)
    eps = sample_episodes(exp.splits["test"], jax.random.PRNGKey(TEST_SEED),
                          config.test_episodes, config.eval_batch_size)
    rename = {"loss": "loss_model", "loss_ci95": "loss_model_ci95"}
    return {rename.get(k, k): v for k, v in res.items()}, eps


def report(exp: Experiment, meta: MetaParams, run: Run | None, config: ConfigDict,
           progress: bool = False) -> dict:
    """Headline comparison on the test tasks, OOD curves, the table and the plot."""
    learner: Compared = exp.eval_learner  # type: ignore[assignment]
    lsa, a = learner.learner, config.analysis
    s, eps = report_comparison(config, exp, meta, progress)
    base = {b.name: b for b in learner.baselines}
    if isinstance(lsa, LSA) and "gd" in base:
        s.update(construction_metrics(lsa, meta, base.get("gdpp", base["gd"]), eps))
    curves = ood_curves({"model": (lsa, meta),
                         **{b.name: (b.learner, jax.tree.map(jnp.asarray, b.meta))
                            for b in learner.baselines if b.align}},
                        jax.tree.map(lambda x: x[:a.ood_tasks], eps))
    s["ood"] = curves
    if "gd" in base:
        for scale in (1.5, 2.0):
            i = INPUT_SCALES.index(scale)
            s[f"ood_input_{scale:g}"] = tuple(curves["input_scale"][k][i]
                                              for k in curves["input_scale"] if k != "scale")
        for b in learner.baselines:
            if b.name in ("gd", "gdpp"):
                s[f"{b.name}_step_sizes"] = {k: float(v) for k, v in b.meta.items()}
    ref = REFERENCE.get(_reference_key(config), {})
    s["table"] = comparison_table(s, ref, learner.baselines, getattr(lsa, "num_layers", 1))
    if run is not None:
        s["plot"] = str(plot_run(run, [b.name for b in learner.baselines if b.align], curves))
    return s

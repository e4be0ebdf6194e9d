"""Continual HyperTransformer on sequences of few-shot Omniglot tasks (task- and class-incremental).

Trains `ContinualHyperTransformer` (or, with `learner.method=constpn`, the Constant ProtoNet
baseline) on sequences of `task.tasks` 5-way tasks drawn from the training characters of the
protocol's split, and reports, on sequences of `task.eval_tasks` tasks of test characters (twice
the training unroll by default: the paper's extrapolation), the accuracy after each task
learned, task- and class-incremental, with 95% CIs: of this learner, of the same generator run
on every task independently (`recurrent=False`: what forgetting looks like) and of the learners
of the runs in `report_baselines` (e.g. a `learner.method=constpn` run), on the same episodes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from metalearn.core import MetaParams
from metalearn.experiment import ConfigDict, Experiment, comma_list
from metalearn.experiments import _omniglot
from metalearn.experiments.ht_omniglot import DOCS as HT_DOCS
from metalearn.learners.continual import MATRICES, ConstPN, ContinualHyperTransformer
from metalearn.runs import Run
from metalearn.seeds import REPORT_SEED
from metalearn.tasks.continual import ContinualSampler

METHODS = ("cht", "constpn")
HT_FIELDS = ("channels", "num_blocks", "trained_blocks", "learned_base", "embed_dim",
             "shared_features", "local_features", "num_layers", "heads", "width_fraction",
             "sequential", "prototypes", "objective", "merged")


def get_config() -> ConfigDict:
    """Sequences of 5 tasks, 5-way 5-shot, 5 queries per class; an 8-channel 3-block CNN, every
    conv layer generated; Adam 1e-3 halved every 2,000 steps, gradients clipped to norm 1, one
    sequence per step; the Vinyals split."""
    c = _omniglot.base_omniglot_config(report_settings="", steps=6000, eval_every=500,
                                       eval_episodes=100, test_episodes=500,
                                       checkpoint_every=500)
    c.task.ways, c.task.shots, c.task.queries, c.task.eval_queries = 5, 5, 5, 5
    c.task.tasks, c.task.eval_tasks, c.task.pool = 5, 10, 0
    c.learner = ConfigDict({"method": "cht", "channels": 8, "num_blocks": 3,
                            "trained_blocks": 0, "learned_base": False, "embed_dim": 32,
                            "shared_features": 32, "local_features": 8, "num_layers": 3,
                            "heads": 2, "width_fraction": 1.0, "sequential": True,
                            "prototypes": "frozen", "objective": "class", "merged": False})
    c.report_episodes = 500
    c.report_baselines = ""
    c.report_independent = True
    c.report_minibatches = True
    c.outer.batch_size = 1
    g = c.outer.gradient
    # clipped: one unclipped step can throw the loss up for good (docs/continual.md)
    g.clip_norm, g.schedule, g.decay_every, g.decay_rate = 1.0, "step", 2000, 0.5
    return c


# `--quick`: sequences of 2 tasks (3 in the report), two generated blocks of one transformer
# layer each, no independent-HT row and no mini-batch panel: compiling each unrolled program
# (one per learner and sequence shape) dominates a short run
QUICK = {"task.tasks": 2, "task.eval_tasks": 3, "learner.num_blocks": 2,
         "learner.num_layers": 1, "report_independent": False, "report_minibatches": False}

DOCS = {**_omniglot.DOCS,
        "task.tasks": "T: tasks per training sequence (the unroll)",
        "task.eval_tasks": "tasks per sequence in the report (the paper extrapolates past T)",
        "task.pool": "distinct classes per sequence (0: tasks x ways, every task new "
                     "classes; ways: every task the same classes, in mini-batches)",
        "learner.method": "cht (Continual HyperTransformer) or constpn (one fixed CNN with "
                          "task-aware prototypes, the paper's ConstPN baseline)",
        **{k: v for k, v in HT_DOCS.items() if k.removeprefix("learner.") in HT_FIELDS},
        "learner.num_blocks": "conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool); the "
                              "flattened output is the embedding",
        "learner.prototypes": "frozen (computed when a task is learned, kept: replay-free) or "
                              "recomputed (every past support set re-embedded each task)",
        "learner.objective": "training loss over the prototypes of every task seen (class) or "
                             "of the query's own task (task)",
        "learner.merged": "MergedHT (the paper's upper bound): the weights after task t are "
                          "generated from the support sets of tasks 0..t at once",
        "report_episodes": "test sequences of task.eval_tasks tasks in the report",
        "report_independent": "also score the same run non-recurrently (each task's weights "
                              "from its own support set alone: the independent HT) in the report",
        "report_minibatches": "also score one task learned from its support in task.eval_tasks "
                              "mini-batches (the paper's mini-batch scenario) in the report",
        "report_baselines": "run directories (comma-separated) of other continual learners "
                            "scored on the report's sequences, e.g. a learner.method=constpn run",
        "report_settings": "unused here (the report is per task learned)",
    }


def make_learner(config: ConfigDict, tasks: int | None = None) -> Any:
    """The configured continual learner for sequences of `tasks` (default task.tasks)."""
    lc, t = config.learner, config.task
    tasks = tasks or t.tasks
    classes = t.pool * tasks // t.tasks if t.pool else 0
    if lc.method not in METHODS:
        raise ValueError(f"learner.method={lc.method!r}: use cht or constpn")
    if lc.method == "constpn":
        return ConstPN(ways=t.ways, tasks=tasks, classes=classes, channels=lc.channels,
                       num_blocks=lc.num_blocks, prototypes=lc.prototypes,
                       objective=lc.objective)
    return ContinualHyperTransformer(ways=t.ways, tasks=tasks, classes=classes,
                                     **{k: lc[k] for k in HT_FIELDS})


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """The continual learner; sequences of the protocol's train, validation, test classes."""
    learner = make_learner(config)
    t = config.task
    if t.pool and t.pool not in (t.ways, t.tasks * t.ways) and t.eval_tasks != t.tasks:
        raise ValueError(f"task.pool={t.pool} (classes coming back) keeps its size only for "
                         f"task.eval_tasks = task.tasks = {t.tasks}; set task.pool=0 (new "
                         f"classes), task.pool={t.ways} (the same classes) or "
                         f"task.eval_tasks={t.tasks}")
    splits = {name: ContinualSampler(s, t.tasks, pool=t.pool)
              for name, s in _omniglot.samplers(config, run).items()}
    return Experiment(learner=learner, splits=splits, report=report, report_plan=report_plan)


def method_label(config: ConfigDict) -> str:
    """CHT, CHT (learned base), MergedHT or ConstPN: what a run's config trains."""
    lc = config.learner
    if lc.get("method", "cht") == "constpn":
        return "ConstPN"
    if lc.get("merged", False):
        return "MergedHT"
    return "CHT (learned base)" if lc.get("learned_base", False) else "CHT"


def continual_scores(learner: Any, meta: MetaParams, episodes: Any,
                     batch_size: int) -> dict[str, np.ndarray]:
    """`learner.unroll` of every episode (leading axis): MATRICES, each [E, T, T]."""
    import jax

    f = jax.jit(jax.vmap(learner.unroll, in_axes=(None, 0)))
    n = jax.tree.leaves(episodes)[0].shape[0]
    parts = [f(meta, jax.tree.map(lambda a, s=s: a[s:s + batch_size], episodes))
             for s in range(0, n, batch_size)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in MATRICES}


def summarize_curves(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per tasks learned t+1: mean accuracy over the tasks seen and on the first task, task-
    and class-incremental, with 95% CIs over episodes."""
    out: dict[str, Any] = {}
    e, T, _ = scores["ci_accuracy"].shape
    seen = np.tril(np.ones((T, T)))
    for kind in ("ti", "ci"):
        acc = scores[f"{kind}_accuracy"]
        per_ep = (acc * seen).sum(-1) / seen.sum(-1)  # [E, T]: mean over tasks seen
        first = acc[:, :, 0]
        for name, v in (("seen", per_ep), ("first", first)):
            out[f"{kind}_{name}"] = v.mean(0).tolist()
            out[f"{kind}_{name}_ci95"] = (1.96 * v.std(0, ddof=1) / np.sqrt(e)).tolist() \
                if e > 1 else [float("nan")] * T
        out[f"{kind}_matrix"] = acc.mean(0).tolist()
    return out


def report_plan(config: ConfigDict) -> tuple[str, int]:
    """The report's learners and test sequences, in words and in all."""
    methods = 1 + (config.learner.method == "cht" and config.get("report_independent", True)) \
        + len(comma_list(config.report_baselines))
    n, t = config.report_episodes, config.task.eval_tasks
    mb = config.get("report_minibatches", True)
    each = f"{n} sequences of {t} tasks" + (f" + {n} of one task in {t} mini-batches" if mb
                                             else "")
    return (f"report {methods} learner{'s' if methods != 1 else ''} x {each}",
            methods * n * (2 if mb else 1))


def report(exp: Experiment, meta: MetaParams, run: Run | None, config: ConfigDict,
           progress: bool = False) -> dict:
    """Accuracy after each of `task.eval_tasks` tasks on test sequences: this learner, the
    same run non-recurrently (CHT only) and the `report_baselines` runs, same sequences."""
    import jax

    from metalearn.evaluation import sample_episodes
    from metalearn.reload import load_run

    if "test" not in exp.splits:
        return {}
    T, T_eval = config.task.tasks, config.task.eval_tasks
    sampler = exp.splits["test"].replace(tasks=T_eval)
    learner = make_learner(config, T_eval)
    methods = {method_label(config): (learner, meta)}
    if isinstance(learner, ContinualHyperTransformer) and config.get("report_independent", True):
        methods["independent HT"] = (dataclasses.replace(learner, recurrent=False), meta)
    for path in comma_list(config.report_baselines):
        other = load_run(path)
        name = f"{method_label(other.config)} ({Path(path).name})"
        methods[name] = (make_learner(other.config, T_eval), other.meta)
    n = config.report_episodes
    episodes = sample_episodes(sampler, jax.random.PRNGKey(REPORT_SEED), n,
                               config.eval_batch_size)
    # the mini-batch scenario: one N-way task whose support arrives in T_eval batches
    ways = sampler.ways
    batches = sample_episodes(sampler.replace(pool=ways), jax.random.PRNGKey(REPORT_SEED + 1),
                              n, config.eval_batch_size) \
        if config.get("report_minibatches", True) else None
    curves = {}
    for name, (lrn, m) in methods.items():
        if progress:
            print(f"report: {name} on {n} sequences of {T_eval} tasks", flush=True)
        curves[name] = summarize_curves(continual_scores(lrn, m, episodes,
                                                         config.eval_batch_size))
        if batches is not None:
            mb = summarize_curves(continual_scores(dataclasses.replace(lrn, classes=ways), m,
                                                   batches, config.eval_batch_size))
            curves[name].update({"mb_seen": mb["ci_seen"], "mb_seen_ci95": mb["ci_seen_ci95"]})
    shown = sorted({0, min(T, T_eval) - 1, T_eval - 1})
    lines = [f"test sequences ({n}) of {T_eval} tasks, {sampler.ways}-way {sampler.shots}-shot "
             f"(trained on {T}); accuracy % after " + " / ".join(str(i + 1) for i in shown)
             + " tasks:"]
    for key, label in (("ti_first", "task-incremental, first task"),
                       ("ci_seen", "class-incremental, all tasks seen"),
                       ("mb_seen", f"mini-batches: one {ways}-way task, its support in "
                                   f"{T_eval} batches, queries of the batches seen")):
        if batches is None and key == "mb_seen":
            continue
        lines.append(f"  {label}:")
        for name, c in curves.items():
            lines.append(f"    {name:<28} " + "   ".join(
                f"{100 * c[key][i]:.2f} ± {100 * c[key + '_ci95'][i]:.2f}"
                for i in shown))
    out = {"report_tasks": T_eval, "curves": curves, "table": "\n".join(lines)}
    if run is not None and run.writes:
        out["figure"] = str(plot_continual(curves, T, run.path / "plots" / "continual.png",
                                           title=config.experiment))
    return out


def plot_continual(curves: dict, trained_tasks: int, path: Path, title: str = "") -> Path:
    """Panels against tasks learned (95% CI bands): task-incremental accuracy on the first
    task and over the tasks seen, class-incremental accuracy over the tasks seen, and the
    accuracy of one task learned from mini-batches of its support."""
    from metalearn.runs import pyplot

    plt = pyplot()
    panels = (("ti_first", "task-incremental: first task"),
              ("ti_seen", "task-incremental: tasks seen"),
              ("ci_seen", "class-incremental: tasks seen"),
              ("mb_seen", "one task in mini-batches"))
    panels = tuple(p for p in panels if all(p[0] in c for c in curves.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, c in curves.items():
            m, ci = np.asarray(c[key]) * 100, np.asarray(c[key + "_ci95"]) * 100
            x = np.arange(1, len(m) + 1)
            ax.plot(x, m, marker="o", ms=3, label=name)
            ax.fill_between(x, m - ci, m + ci, alpha=0.2)
        ax.axvline(trained_tasks, color="grey", ls=":", lw=1)
        ax.set(title=label, xlabel="mini-batches learned" if key == "mb_seen" else
               "tasks learned", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (dotted: training unroll)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

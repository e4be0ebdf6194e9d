"""What the Hebbian-genome experiments share: the learner from the config, and the report that
tests the paper's claim on unseen tasks: the network trained by the learned rule against the same
network trained by SGD and by Adam, their learning rates tuned on the training tasks, at T inner
steps (the meta-training unroll) and at `horizon` x T, with the accuracy-versus-step curves.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import Array, Episode, InnerLearner, MetaParams, TaskSampler, Wrapper
from metalearn.evaluation import evaluate
from metalearn.experiment import ConfigDict, Experiment, cached_json, comma_list, outer_config
from metalearn.learners.hebbian import HebbianLearner
from metalearn.learners.network import GradientBaseline, Network
from metalearn.runs import Run, pyplot, save_figure
from metalearn.seeds import BASELINE_OFFSET, REPORT_SEED

NETWORK_FIELDS = ("ways", "hidden", "inner_steps", "inner_batch_size", "replicas",
                  "hidden_activation", "output_activation", "init_scale", "target_low",
                  "meta_loss")


def learner_config(**overrides: Any) -> ConfigDict:
    """The `learner` section: the network, the rule's options (paper-code defaults)."""
    c = ConfigDict({"hidden": "20", "states": 2, "inner_steps": 5, "inner_batch_size": 0,
                    "replicas": 1, "hidden_activation": "relu_tanh",
                    "output_activation": "tanh", "backward_activation": "relu_tanh",
                    "backward_update": "additive", "feedback": "label",
                    "symmetric_synapses": False, "symmetric_states": False,
                    "normalize_synapses": False, "oja": False, "saturation": False,
                    "truncate": 0, "genome_std": 1.0, "synapse_update_init": -1e-3,
                    "init_scale": 1.0, "target_low": -1.0, "meta_loss": "mse",
                    "score_steps": ""})
    for k, v in overrides.items():
        c[k] = v
    return c


def hebbian_outer(batch_size: int, steps_per_call: int) -> ConfigDict:
    """Adam 3e-3 with gradient clipping, or (outer.kind=evolution) full CMA-ES at population
    32: the genome has tens of numbers."""
    return outer_config("gradient", gradient={"learning_rate": 3e-3, "clip_norm": 1.0},
                        evolution={"strategy": "CMA_ES", "population_size": 32,
                                   "std_init": 0.1},
                        batch_size=batch_size, steps_per_call=steps_per_call)


def report_config(c: ConfigDict) -> None:
    """Add the comparison's fields to a config."""
    c.report_horizon = 4
    c.report_episodes = 1000
    c.baseline_lrs = "0.001,0.003,0.01,0.03,0.1,0.3,1,3,10"
    c.tune_episodes = 500
    c.report_runs = ""
    c.report_dataset = ""


# `--quick`: the report's SGD/Adam tuning on a few tasks and rates, not 500 x 9
QUICK = {"tune_episodes": 20, "baseline_lrs": "0.01,0.1,1"}

DOCS = {
    "learner.hidden": "hidden layer widths, comma-separated (e.g. 20 or 100,50)",
    "learner.states": "states per neuron (k); the genome has 4k^2 + 4 numbers",
    "learner.inner_steps": "Hebbian updates per episode (T, the meta-training unroll)",
    "learner.inner_batch_size": "support examples per inner step (0: all of them)",
    "learner.replicas": "synapse initialisations per episode (metrics averaged)",
    "learner.hidden_activation": "forward activation of hidden neurons",
    "learner.output_activation": "forward activation of the output layer",
    "learner.backward_activation": "activation of the backward pass",
    "learner.backward_update": "additive, multiplicative or multiplicative_second_state",
    "learner.feedback": "what enters output state 1: label (the target code) or error",
    "learner.symmetric_synapses": "backward block = forward block transposed",
    "learner.symmetric_states": "every synapse channel = channel 0",
    "learner.normalize_synapses": "unit-norm incoming weights times a learned scale",
    "learner.oja": "Oja decay of the synapses (learned multiplier)",
    "learner.saturation": "exp-saturated synapse updates (learned strength)",
    "learner.truncate": "meta-gradients through the last N inner steps only (0: all)",
    "learner.genome_std": "std of the random genome's transforms",
    "learner.synapse_update_init": "the random genome's synapse learning rate eta_w",
    "learner.init_scale": "synapses ~ U(-1, 1) * init_scale / sqrt(n_in + 1 + n_out)",
    "learner.target_low": "off value of the one-hot target codes (on: 1)",
    "learner.meta_loss": "query scoring: mse (the paper's code), balanced_mse (true class and "
                         "the others weigh half each) or cross_entropy",
    "learner.score_steps": "inner step counts (comma-separated, e.g. 10,100) after which the "
                           "meta-loss scores the queries, averaged; empty: after inner_steps",
    "report_horizon": "the report also scores horizon x T inner steps (beyond the unroll)",
    "report_episodes": "unseen test tasks of the report (each with its own initialisation)",
    "baseline_lrs": "learning rates tried for SGD and Adam on the training tasks",
    "tune_episodes": "training tasks each baseline learning rate is scored on",
    "report_runs": "run directories (comma-separated) of other learners of the same network "
                   "(a Hebbian genome, a learned optimizer) scored on the same test tasks",
    "report_dataset": "image dataset the report also scores every learner on, with the "
                      "training tasks' settings (e.g. sklearn:digits, an image folder, a .npz; "
                      "see `metalearn evaluate --help`); empty: none",
}


def build_learner(config: ConfigDict, ways: int) -> HebbianLearner:
    """The HebbianLearner of `config.learner` for `ways` classes."""
    return HebbianLearner(ways=ways, **network_fields(config.learner.to_dict()))


def network_fields(cfg: dict) -> dict:
    """`cfg` (a `learner` section as a dict) with the network's comma lists and zeros parsed:
    hidden and score_steps as tuples, inner_batch_size 0 as None."""
    cfg = dict(cfg)
    for field in ("hidden", "score_steps"):
        items = comma_list(cfg.get(field, ""))
        if not all(s.lstrip("-").isdigit() for s in items):
            raise ValueError(f"learner.{field}={cfg[field]!r}: give whole numbers separated by "
                             f"commas (e.g. --set learner.{field}=10,100)")
        cfg[field] = tuple(int(s) for s in items)
    cfg["inner_batch_size"] = cfg["inner_batch_size"] or None
    return cfg


def baseline(learner: Network, optimizer: str) -> GradientBaseline:
    """The same network as `learner` (f for f/f' neurons), trained by `optimizer` at the rate
    of its meta-parameters {"learning_rate": lr}."""
    same = {f: getattr(learner, f) for f in NETWORK_FIELDS}
    for f in ("hidden_activation", "output_activation"):  # f(z) of the f / f' neurons
        same[f] = same[f].removesuffix("_with_grad")
    return GradientBaseline(optimizer=optimizer, **same)


@dataclasses.dataclass(frozen=True)
class Curve(Wrapper):
    """Scores `learner` after every inner step 0..steps: metrics accuracy_<t> (and loss at T)."""

    learner: Any
    steps: int

    def loss(self, meta: MetaParams, episode: Episode, key: Array) -> tuple[Array, dict]:
        """Loss after T steps; accuracy after each of 0..steps steps."""
        c = self.learner.curve(meta, episode, key, self.steps)
        t = self.learner.inner_steps
        out = {f"accuracy_{i}": c["accuracy"][i] for i in range(self.steps + 1)}
        return c["loss"][t], {"loss": c["loss"][t], "accuracy": c["accuracy"][t], **out}


def _curve(learner: InnerLearner, meta: MetaParams, sampler: TaskSampler, steps: int,
           episodes: int, batch: int, seed: int, progress: str | None = None) -> dict:
    res = evaluate(Curve(learner, steps), meta, sampler, jax.random.PRNGKey(seed), episodes,
                   batch, progress=progress, check=False)
    return {"mean": [res[f"accuracy_{i}"] for i in range(steps + 1)],
            "ci95": [res[f"accuracy_{i}_ci95"] for i in range(steps + 1)]}


def tune(learner: Network, optimizer: str, sampler: TaskSampler, lrs: list[float],
         episodes: int, batch: int, progress: bool = False) -> tuple[float, dict]:
    """The rate of `lrs` whose network is most accurate after T steps on training tasks (the
    rate a meta-parameter: one compiled program per optimizer)."""
    scores = {}
    for lr in lrs:
        res = evaluate(baseline(learner, optimizer), {"learning_rate": jnp.float32(lr)}, sampler,
                       jax.random.PRNGKey(REPORT_SEED + BASELINE_OFFSET), episodes, batch,
                       check=False, progress=f"tuning {optimizer} lr={lr:g}" if progress else None)
        scores[lr] = res["accuracy"]
    return max(scores, key=scores.get), scores


TUNING_FILE = "baseline_tuning.json"


def tuned_rates(learner: Network, sampler: TaskSampler, lrs: list[float], episodes: int,
                batch: int, run: Run | None, progress: bool = False) -> dict:
    """SGD's and Adam's tuned rates and their scores, kept in the run (TUNING_FILE): the tuning
    depends on the network, the training tasks and these settings, not on the trained rule, so
    a report made again (evaluate, resume) reads it back unless the settings changed."""
    settings = {"learning_rates": lrs, "episodes": episodes, "learner": repr(learner),
                "sampler": sampler.describe()}

    def fit() -> dict:
        out = {}
        for opt in ("sgd", "adam"):
            lr, scores = tune(learner, opt, sampler, lrs, episodes, batch, progress)
            out[opt] = {"learning_rate": lr, "train_accuracy": {str(k): v for k, v in
                                                                 scores.items()}}
        return out

    return cached_json(run, TUNING_FILE, fit, key=settings)


def _tuning(exp: Experiment, run: Run | None, config: ConfigDict, progress: bool) -> dict:
    """`tuned_rates` at the config's rates, tuning episodes and batch."""
    lrs = [float(v) for v in comma_list(config.baseline_lrs)]
    return tuned_rates(exp.learner, exp.train, lrs, config.tune_episodes,
                       config.eval_batch_size, run, progress)


def report_plan(config: ConfigDict) -> tuple[str, int]:
    """The report's test (and `report_dataset`) curves and baseline tuning (unless kept in
    the run), in words and episodes."""
    curves = 3 + len(comma_list(config.get("report_runs", "")))
    rates = len(comma_list(config.baseline_lrs))
    n, tune = config.report_episodes, config.tune_episodes
    spec = config.get("report_dataset", "")
    sets = 2 if spec else 1
    where = f"test episodes and {curves} x {n} of {spec}" if spec else "test episodes"
    return (f"report {curves} curves x {n} {where} + SGD/Adam tuning 2 x {rates} rates x "
            f"{tune} training episodes", sets * curves * n + 2 * rates * tune)


def report(exp: Experiment, meta: MetaParams, run: Run | None, config: ConfigDict,
           progress: bool = False) -> dict:
    """Rule vs SGD vs Adam (rates tuned on training tasks) on the test tasks, at T and
    horizon x T inner steps, and the same on `report_dataset`'s tasks when one is named; the
    accuracy-versus-step figures in the run's plots/."""
    if "test" not in exp.splits:
        return {}
    learner = exp.learner
    t, steps = learner.inner_steps, learner.inner_steps * config.report_horizon
    learners = {"rule": (learner, meta), **_report_runs(config, learner)}
    out: dict = {"report_steps": sorted({t * k for k in (1, 4) if t * k <= steps} | {steps})}
    tuning = _tuning(exp, run, config, progress)
    out["tuning"] = {opt: tuning[opt] for opt in ("sgd", "adam")}
    learners.update(_tuned_baselines(learner, tuning))
    test = _report_curves(learners, exp.splits["test"], "test tasks", steps, config, out["tuning"],
                          progress)
    out.update(test)
    tables = [test["table"]]
    spec = config.get("report_dataset", "")
    if spec:
        # the training split's episode settings (no rotations as classes) on the other dataset
        sampler, info = exp.train.for_dataset(spec)
        other = _report_curves(learners, sampler, f"{info['name']} tasks", steps, config,
                               out["tuning"], progress)
        out["dataset"] = {**info, **other}
        tables.append(other["table"])
    out["table"] = "\n".join(tables)
    if run is not None and run.writes:
        plot_curves(test["curves"], t, run.path / "plots" / "accuracy_vs_steps.png",
                    title=config.experiment)
        if spec:
            plot_curves(out["dataset"]["curves"], t,
                        run.path / "plots" / f"accuracy_vs_steps_{info['name']}.png",
                        title=f"{config.experiment} on {info['name']}")
    return out


def _report_curves(learners: dict, sampler: TaskSampler, what: str, steps: int,
                   config: ConfigDict, tuning: dict, progress: bool) -> dict:
    """Every learner's accuracy curve on the same `report_episodes` tasks of `sampler`; the
    figures at T, 4T and `steps` by name and as a table."""
    t, n = config.learner.inner_steps, config.report_episodes
    shown = sorted({t * k for k in (1, 4) if t * k <= steps} | {steps})
    curves = {name: _curve(lrn, m, sampler, steps, n, config.eval_batch_size, REPORT_SEED,
                           f"report ({what}): {name}" if progress else None)
              for name, (lrn, m) in learners.items()}
    out: dict = {"curves": curves}
    lines = [f"{what} ({n}), accuracy % at " + ", ".join(
        f"{s} ({s // t}T)" if s != t else f"T={t}" for s in shown) + " inner steps:"]
    for name, c in curves.items():
        lr = f" (lr {tuning[name]['learning_rate']:g})" if name in tuning else ""
        out[f"{name}_accuracy"] = {str(s): {"mean": c["mean"][s], "ci95": c["ci95"][s]}
                                   for s in shown}
        lines.append(f"  {name + lr:<28} " + "   ".join(
            f"{100 * c['mean'][s]:.2f} ± {100 * c['ci95'][s]:.2f}" for s in shown))
    out["table"] = "\n".join(lines)
    return out


def baselines(exp: Experiment, run: Run | None, config: ConfigDict,
              progress: Any = False) -> dict[str, tuple[Any, MetaParams]]:
    """SGD and Adam at the rates tuned on training tasks (read back from the run's
    TUNING_FILE, else tuned now) and the `report_runs` learners: what `metalearn evaluate`
    scores beside the trained rule."""
    tuning = _tuning(exp, run, config, bool(progress))
    out = {f"{opt} (lr {tuning[opt]['learning_rate']:g}, tuned)": pair
           for opt, pair in _tuned_baselines(exp.learner, tuning).items()}
    return {**out, **_report_runs(config, exp.learner)}


def _tuned_baselines(learner: Network, tuning: dict) -> dict[str, tuple[Any, dict]]:
    """{"sgd"/"adam": (the baseline of `learner`'s network, its tuned rate as meta)}."""
    return {opt: (baseline(learner, opt),
                  {"learning_rate": jnp.float32(tuning[opt]["learning_rate"])})
            for opt in ("sgd", "adam")}


def _report_runs(config: ConfigDict, learner: Any) -> dict[str, tuple[Any, MetaParams]]:
    """The learners of the runs named in `report_runs`, on this report's network and T (they
    must train the same network: same layers, activations and ways)."""
    from pathlib import Path

    from metalearn.reload import load_run

    out = {}
    for path in comma_list(config.get("report_runs", "")):
        run = load_run(path)
        other = run.learner
        same = {f: getattr(learner, f) for f in NETWORK_FIELDS if f != "meta_loss"}
        theirs = {f: getattr(other, f, None) for f in same}
        for f in ("hidden_activation", "output_activation"):
            theirs[f] = str(theirs[f]).removesuffix("_with_grad")
            same[f] = str(same[f]).removesuffix("_with_grad")
        if theirs != same:
            diff = {f: (theirs[f], same[f]) for f in same if theirs[f] != same[f]}
            raise ValueError(f"report_runs: {path} trains another network than this run "
                             f"({diff}: theirs, ours); compare learners of one network")
        out[f"{type(other).__name__} ({Path(path).name})"] = (other, run.meta)
    return out


def plot_curves(curves: dict, t: int, path: Any, title: str = "") -> Any:
    """Accuracy (95% CI band) against inner steps, one line per learner; T marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        m, ci = np.asarray(c["mean"]), np.asarray(c["ci95"])
        steps = np.arange(len(m))
        ax.plot(steps, 100 * m, label=name)
        ax.fill_between(steps, 100 * (m - ci), 100 * (m + ci), alpha=0.2)
    ax.axvline(t, color="gray", linestyle=":", label=f"T = {t} (meta-training unroll)")
    ax.set_xlabel("inner steps")
    ax.set_ylabel("query accuracy on unseen tasks (%)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)

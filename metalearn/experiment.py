"""Experiments: named config modules in `experiments/`, plus training and evaluation of runs.

An experiment module `metalearn.experiments.NAME` has a one-line docstring and two functions:

    get_config() -> ml_collections.ConfigDict     # every field overridable with --set key=value
    build(config, run: Run | None) -> Experiment  # learner and samplers per split

The outer loop is built from `config.outer` (`outer_config`).

and optionally `report(exp, meta, run) -> dict` for extra headline numbers in summary.json.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from metalearn.checkpoint import Checkpointer, CheckpointError
from metalearn.core import InnerLearner, MetaParams, TaskSampler
from metalearn.evaluation import evaluate
from metalearn.runs import Run

ConfigDict = ml_collections.ConfigDict


@dataclasses.dataclass
class Experiment:
    """What an experiment's `build` returns."""

    learner: InnerLearner
    splits: dict[str, TaskSampler]  # at least "train"; "validation"/"test" for held-out tasks
    # scores evaluations when given (same meta-parameters as `learner`, e.g. extra metrics)
    eval_learner: InnerLearner | None = None
    report: Callable[[Experiment, MetaParams, Run | None], dict] | None = None

    @property
    def evaluator(self) -> InnerLearner:
        """The learner that scores evaluations."""
        return self.eval_learner or self.learner

    @property
    def train(self) -> TaskSampler:
        """The meta-training sampler."""
        return self.splits["train"]

    @property
    def eval_split(self) -> str | None:
        """The split evaluated during training: validation if there is one, else test."""
        return next((s for s in ("validation", "test") if s in self.splits), None)


def outer_config(kind: str = "gradient", **overrides: Any) -> ConfigDict:
    """Config of an outer loop: the union of gradient and evolution fields, `kind` picks."""
    from metalearn.outer.evolution import EvolutionOuterLoop
    from metalearn.outer.gradient import GradientOuterLoop

    c = ConfigDict({"kind": kind})
    for cls in (GradientOuterLoop, EvolutionOuterLoop):
        for f in dataclasses.fields(cls):
            if f.name not in c and f.name not in ("total_steps", "shard"):
                c[f.name] = f.default
    c.shard = "auto"
    for k, v in overrides.items():
        if k not in c:
            raise KeyError(f"outer has no field {k!r}; fields: {sorted(c.keys())}")
        c[k] = v
    return c


def build_outer(c: ConfigDict, total_steps: int = 0):
    """An OuterLoop from its config (`kind` = 'gradient' or 'evolution')."""
    from metalearn.outer.evolution import EvolutionOuterLoop
    from metalearn.outer.gradient import GradientOuterLoop

    kinds = {"gradient": GradientOuterLoop, "evolution": EvolutionOuterLoop}
    if c.kind not in kinds:
        raise ValueError(f"outer.kind={c.kind!r}; choose 'gradient' or 'evolution'")
    cls = kinds[c.kind]
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in c.items() if k in names and k != "shard"}
    kw["shard"] = {"auto": None, True: True, False: False}.get(c.get("shard", "auto"), None)
    if "total_steps" in names:
        kw["total_steps"] = total_steps
    return cls(**kw)


def base_config(**overrides: Any) -> ConfigDict:
    """Fields every experiment has (steps, seed, evaluation, checkpoints, outer loop)."""
    c = ConfigDict({
        "experiment": "",
        "seed": 0,
        "steps": 1000,
        "eval_every": 0,
        "eval_episodes": 1000,
        "eval_batch_size": 250,  # episodes per compiled evaluation call (memory vs speed)
        "test_episodes": 1000,
        "checkpoint_every": 0,
        "log_every": 1,
        "outer": outer_config(),
    })
    for k, v in overrides.items():
        c[k] = v
    return c


# ---------------------------------------------------------------- discovery and overrides


def list_experiments() -> list[tuple[str, str]]:
    """(name, one-line description) of every experiment module."""
    import metalearn.experiments as pkg

    out = []
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name.startswith("_"):
            continue
        mod = importlib.import_module(f"metalearn.experiments.{m.name}")
        if hasattr(mod, "get_config") and hasattr(mod, "build"):
            doc = (mod.__doc__ or "").strip().splitlines()
            out.append((m.name, doc[0] if doc else ""))
    return sorted(out)


def load_module(name: str):
    """The experiment module called `name`."""
    names = [n for n, _ in list_experiments()]
    if name not in names:
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(names)} "
                         "(see `metalearn list`)")
    return importlib.import_module(f"metalearn.experiments.{name}")


def _parse_value(text: str, current: Any) -> Any:
    low = text.strip().lower()
    if isinstance(current, bool) or low in ("true", "false"):
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if low in ("none", "null"):
        return None
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        v = text
    if isinstance(current, float) and isinstance(v, int):
        v = float(v)
    if isinstance(current, int) and isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(current, str) and not isinstance(v, str):
        v = text
    return v


def apply_overrides(config: ConfigDict, sets: Sequence[str]) -> ConfigDict:
    """Apply `key.sub=value` overrides; unknown keys and wrong types raise a clear error."""
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set expects key=value, got {s!r}")
        key, text = s.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for i, p in enumerate(parts[:-1]):
            if p not in node or not isinstance(node[p], ConfigDict):
                raise KeyError(f"--set {key}: {'.'.join(parts[:i + 1])!r} is not a config "
                               f"section; sections here: "
                               f"{sorted(k for k, v in node.items() if isinstance(v, ConfigDict))}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            raise KeyError(f"--set {key}: no field {leaf!r}; fields here: {sorted(node.keys())}")
        cur = node[leaf]
        if isinstance(cur, ConfigDict):
            raise KeyError(f"--set {key}: {key!r} is a section; set one of its fields: "
                           f"{sorted(cur.keys())}")
        val = _parse_value(text, cur)
        if cur is not None and val is not None and not isinstance(val, type(cur)) and not (
                isinstance(cur, float) and isinstance(val, int)):
            raise TypeError(f"--set {key}={text}: expected a {type(cur).__name__} "
                            f"(current value {cur!r}), got {type(val).__name__}")
        with node.ignore_type():
            node[leaf] = val
    return config


# ---------------------------------------------------------------- train and evaluate


def default_run_dir(name: str, seed: int) -> Path:
    """runs/NAME-sSEED-YYYYmmdd-HHMMSS."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-s{seed}-{stamp}"


def build_experiment(config: ConfigDict, run: Run | None = None) -> Experiment:
    """Build an experiment (learner, samplers, outer loop) from its config."""
    mod = load_module(config.experiment)
    return mod.build(config, run)


def train(name: str, sets: Sequence[str] = (), seed: int | None = None,
          run_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True) -> tuple[Run, dict]:
    """Train experiment `name` (or resume the run in `run_dir`); returns (run, summary)."""
    if resume:
        if run_dir is None:
            raise ValueError("--resume needs --run-dir, the run directory to continue")
        run = Run(run_dir)
        if not (run.path / "config.json").exists():
            raise FileNotFoundError(f"cannot resume: {run.path / 'config.json'} does not exist; "
                                    "is this a run directory made by `metalearn train`?")
        config = ConfigDict(run.read_json("config.json"))
        if name and name != config.experiment:
            raise ValueError(f"{run.path} is a run of {config.experiment!r}, not {name!r}")
        apply_overrides(config, sets)
    else:
        config = load_module(name).get_config()
        config.experiment = name
        if seed is not None:
            config.seed = seed
        apply_overrides(config, sets)
        run = Run(run_dir or default_run_dir(name, config.seed))
    exp = build_experiment(config, run)
    run.write_json("config.json", config.to_dict())
    outer = build_outer(config.outer, config.steps)
    from metalearn.outer.base import RunOptions

    split = exp.eval_split
    result = outer.run(
        exp.learner, exp.train, jax.random.PRNGKey(config.seed), steps=config.steps,
        eval_sampler=exp.splits.get(split) if split else None, run_dir=run.path,
        config=config.to_dict(), resume=resume,
        options=RunOptions(eval_every=config.eval_every, eval_episodes=config.eval_episodes,
                           eval_batch_size=config.get("eval_batch_size", 250),
                           checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                           progress=progress),
        eval_learner=exp.eval_learner)
    summary: dict[str, Any] = {"experiment": config.experiment, "steps": config.steps,
                               "seed": config.seed,
                               "steps_per_second": result.steps_per_second}
    train_recs = [r for r in result.history if r.get("split") == "train"]
    if train_recs:
        summary["final_train_loss"] = float(np.mean([r["loss"] for r in train_recs[-50:]]))
    if result.final_eval is not None:
        summary[split] = result.final_eval
    if "test" in exp.splits and split != "test":
        summary["test"] = evaluate(exp.evaluator, result.meta, exp.splits["test"],
                                   jax.random.PRNGKey(2_000_003), config.test_episodes,
                                   config.get("eval_batch_size", 250))
    if exp.report is not None:
        summary.update(exp.report(exp, result.meta, run))
    run.write_json("summary.json", summary)
    return run, summary


def load_trained(run_dir: str | Path, step: int | None = None) -> tuple[ConfigDict, Experiment,
                                                                        MetaParams, int]:
    """(config, experiment, meta-parameters, step) of a trained run, from its checkpoint."""
    run = Run(run_dir)
    if not (run.path / "config.json").exists():
        raise FileNotFoundError(f"{run.path} is not a metalearn run directory (no config.json); "
                                "pass the --run-dir of a `metalearn train` run")
    config = ConfigDict(run.read_json("config.json"))
    exp = build_experiment(config, run)
    outer = build_outer(config.outer, config.steps)
    template = outer.init(exp.learner, exp.train, jax.random.PRNGKey(config.seed))
    ckpt = Checkpointer(run.checkpoint_dir, max_to_keep=None)
    if ckpt.latest_step() is None:
        raise CheckpointError(f"no checkpoint in {run.checkpoint_dir}; was the run trained?")
    done, state = ckpt.restore(template, step)
    state = jax.tree.map(jax.numpy.asarray, state)
    return config, exp, outer.meta_params(state), done


def evaluate_run(run_dir: str | Path, split: str = "test", episodes: int = 1000,
                 seed: int = 0, ways: int | None = None, shots: int | None = None,
                 queries: int | None = None, unlabeled: int | None = None) -> dict:
    """Evaluate a trained run on one of its splits; saves eval_SPLIT.json in the run.

    `ways`, `shots`, `queries`, `unlabeled` (None keeps the run's) evaluate few-shot runs
    at another N-way K-shot setting, e.g. with unlabeled images for semi-supervised learners;
    the result goes to eval_SPLIT_<setting>.json, next to (not over) the default one."""
    config, exp, meta, step = load_trained(run_dir)
    if split not in exp.splits:
        raise ValueError(f"split {split!r} not available for {config.experiment}; "
                         f"choose one of {sorted(exp.splits)}")
    sampler, name = exp.splits[split], f"eval_{split}.json"
    setting = {k: v for k, v in (("ways", ways), ("shots", shots), ("queries", queries),
                                 ("unlabeled", unlabeled)) if v is not None}
    if setting:
        if not hasattr(sampler, "with_ways_shots"):
            raise ValueError(f"the {split} sampler of {config.experiment!r} "
                             f"({type(sampler).__name__}) has no ways/shots/queries/unlabeled "
                             "settings; they are for few-shot classification runs")
        sampler = sampler.with_ways_shots(**setting)
        try:  # the learner's own shape checks (e.g. a MAML head narrower than the ways)
            exp.evaluator.init(jax.random.PRNGKey(0), sampler.example())
        except ValueError as e:
            raise ValueError(f"{config.experiment} cannot be evaluated at "
                             f"{sampler.ways}-way {sampler.shots}-shot: {e}") from None
        tag = (f"{sampler.ways}way_{sampler.shots}shot_{sampler.queries}query"
               + (f"_{sampler.unlabeled}unlabeled" if sampler.unlabeled else ""))
        name = f"eval_{split}_{tag}.json"
    res = evaluate(exp.evaluator, meta, sampler, jax.random.PRNGKey(3_000_017 + seed),
                   episodes, config.get("eval_batch_size", 250))
    res = {"split": split, "step": step, **res}
    if setting:
        res["setting"] = {k: getattr(sampler, k) for k in ("ways", "shots", "queries",
                                                            "unlabeled")}
    Run(run_dir).write_json(name, res)
    return res


def evaluate_manifest(run_dir: str | Path, manifest: str | Path, split: str = "test") -> dict:
    """Evaluate a trained run on the fixed episodes of a manifest file.

    The episodes' images are read and preprocessed by the run's own `split` sampler, so they
    go through exactly the training preprocessing. Saves eval_manifest_NAME.json in the run.
    """
    from metalearn.evaluation import evaluate_episodes

    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    config, exp, meta, step = load_trained(run_dir)
    sampler = exp.splits.get(split, exp.train)
    if not hasattr(sampler, "episodes_from_manifest"):
        raise ValueError(f"the samplers of {config.experiment!r} ({type(sampler).__name__}) "
                         "cannot read episode manifests; manifests are for few-shot image tasks")
    episodes = sampler.episodes_from_manifest(manifest)
    res = evaluate_episodes(exp.evaluator, meta, episodes, jax.random.PRNGKey(4_000_037))
    res = {"split": f"manifest:{manifest.name}", "step": step, **res}
    Run(run_dir).write_json(f"eval_manifest_{manifest.stem}.json", res)
    return res

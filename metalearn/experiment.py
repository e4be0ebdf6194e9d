"""Experiments: named config modules in `experiments/`, plus training and evaluation of runs.

An experiment module `metalearn.experiments.NAME` has a one-line docstring and two functions:

    get_config() -> ml_collections.ConfigDict     # every field overridable with --set key=value
    build(config, run: Run | None) -> Experiment  # learner and samplers per split

and optionally a `DOCS` dict (dotted field name -> one-line description, shown by
`metalearn config NAME`). `build` must be cheap: it runs again for every `metalearn evaluate`,
so work such as fitting a baseline is done once and kept in the run directory
(`cached_json`). The outer loop is built from `config.outer` (`outer_config`). The experiment
may set `Experiment.report`, called after training with the run's config, for extra headline
figures in summary.json.
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
from metalearn.seeds import MANIFEST_SEED, TEST_SEED

ConfigDict = ml_collections.ConfigDict


@dataclasses.dataclass
class Experiment:
    """What an experiment's `build` returns."""

    learner: InnerLearner
    splits: dict[str, TaskSampler]  # at least "train"; "validation"/"test" for held-out tasks
    # scores evaluations when given (same meta-parameters as `learner`, e.g. extra metrics)
    eval_learner: InnerLearner | None = None
    # extra headline figures: report(exp, meta, run, config, progress=...) -> dict for summary.json
    report: Callable[..., dict] | None = None

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


OUTER_KINDS = ("gradient", "evolution")
# Fields both outer loops take, with one meaning: they sit in `outer` itself.
SHARED_OUTER_FIELDS = ("batch_size", "steps_per_call")


def _outer_classes() -> dict[str, type]:
    from metalearn.outer.evolution import EvolutionOuterLoop
    from metalearn.outer.gradient import GradientOuterLoop

    return {"gradient": GradientOuterLoop, "evolution": EvolutionOuterLoop}


def _section_fields(cls: type) -> dict[str, Any]:
    skip = {*SHARED_OUTER_FIELDS, "total_steps", "shard"}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def outer_config(kind: str = "gradient", gradient: dict | None = None,
                 evolution: dict | None = None, **shared: Any) -> ConfigDict:
    """Config of the outer loop: `kind` picks `outer.gradient.*` or `outer.evolution.*`.

    `batch_size` (episodes per meta-step / per generation), `steps_per_call` and `shard` are
    shared; every other field lives in the section of the one loop that reads it.
    """
    classes = _outer_classes()
    if kind not in classes:
        raise ValueError(f"outer.kind={kind!r}; choose one of {', '.join(OUTER_KINDS)}")
    g = classes["gradient"]
    c = ConfigDict({"kind": kind, **{k: getattr(g, k) for k in SHARED_OUTER_FIELDS},
                    "shard": "auto"})
    for name, given in (("gradient", gradient), ("evolution", evolution)):
        section = _section_fields(classes[name])
        for k, v in (given or {}).items():
            if k not in section:
                raise KeyError(f"outer.{name} has no field {k!r}; fields: {sorted(section)}")
            section[k] = v
        c[name] = ConfigDict(section)
    for k, v in shared.items():
        if k not in c or k in OUTER_KINDS:
            raise KeyError(f"outer has no shared field {k!r}; shared fields: "
                           f"{[*SHARED_OUTER_FIELDS, 'shard']}; the others go in gradient={{...}}"
                           " or evolution={...}")
        c[k] = v
    return c


def upgrade_outer(outer: dict) -> dict:
    """An `outer` config of the runs made before the per-loop sections, in today's form."""
    if any(k in outer for k in OUTER_KINDS):
        return outer
    shared = {k: outer[k] for k in (*SHARED_OUTER_FIELDS, "shard") if k in outer}
    sections = {k: {f: outer[f] for f in _section_fields(cls) if f in outer}
                for k, cls in _outer_classes().items()}
    from metalearn.outer.evolution import ADAM_STRATEGIES

    evo = sections["evolution"]
    if evo.get("strategy") not in ADAM_STRATEGIES:
        evo["learning_rate"] = None  # the field was ignored by these strategies
    kind = outer.get("kind", "gradient")
    return outer_config(kind, **sections, **shared).to_dict()


def used_outer(c: ConfigDict) -> ConfigDict:
    """`c` (an outer config) without the section of the loop kind it does not use."""
    return ConfigDict({k: v for k, v in c.items() if k not in OUTER_KINDS or k == c.kind})


def check_outer_sets(c: ConfigDict, sets: Sequence[str]) -> None:
    """Refuse `--set outer.SECTION.FIELD` for the section that `outer.kind` does not use."""
    for s in sets:
        parts = s.split("=", 1)[0].strip().split(".")
        if len(parts) >= 3 and parts[0] == "outer" and parts[1] in OUTER_KINDS \
                and parts[1] != c.kind:
            other = f"outer.{c.kind}.{parts[2]}"
            alt = (f"set {other} instead, or " if parts[2] in c[c.kind] else "")
            raise ValueError(f"--set {'.'.join(parts)}: this run's loop is outer.kind={c.kind}, "
                             f"which reads outer.{c.kind}.*, not outer.{parts[1]}.*; {alt}"
                             f"add --set outer.kind={parts[1]} to train with that loop")


def build_outer(c: ConfigDict, total_steps: int = 0):
    """An OuterLoop from its config: `c.kind`'s section plus the shared fields."""
    classes = _outer_classes()
    if c.kind not in classes:
        raise ValueError(f"outer.kind={c.kind!r}; choose one of {', '.join(OUTER_KINDS)}")
    if c.kind not in c:
        raise KeyError(f"outer.kind={c.kind!r} but the config has no outer.{c.kind} section")
    cls = classes[c.kind]
    kw = {**c[c.kind].to_dict(), **{k: c[k] for k in SHARED_OUTER_FIELDS}}
    kw["shard"] = {"auto": None, True: True, False: False}.get(c.get("shard", "auto"), None)
    if "total_steps" in {f.name for f in dataclasses.fields(cls)}:
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


BASE_DOCS = {
    "experiment": "the experiment's name (set by `metalearn train`)",
    "seed": "seed of the run: initial meta-parameters and every episode drawn",
    "steps": "meta-steps in total (counting those before a --resume)",
    "eval_every": "evaluate on the validation (else test) split every N steps (0: at the end)",
    "eval_episodes": "episodes per periodic evaluation",
    "eval_batch_size": "episodes per compiled evaluation call (memory vs speed)",
    "test_episodes": "episodes of the final test evaluation (and of `metalearn evaluate`)",
    "checkpoint_every": "checkpoint every N steps (0: only at the end)",
    "log_every": "write training metrics every N steps",
    "outer.kind": "outer loop: gradient (outer.gradient.*) or evolution (outer.evolution.*)",
    "outer.batch_size": "episodes per meta-step (gradient) or per generation, shared by all "
                        "candidates (evolution)",
    "outer.steps_per_call": "meta-steps compiled into one call (speed only; same numbers)",
    "outer.shard": "split the batch / population across devices: auto, true or false",
}


def field_docs(module: Any = None) -> dict[str, str]:
    """One-line description of every config field: base fields, outer loops, the experiment's."""
    docs = dict(BASE_DOCS)
    for kind, cls in _outer_classes().items():
        for f in dataclasses.fields(cls):
            if "doc" in f.metadata:
                docs[f"outer.{kind}.{f.name}"] = f.metadata["doc"]
    docs.update(getattr(module, "DOCS", {}))
    return docs


def describe_config(config: ConfigDict, docs: dict[str, str]) -> list[tuple[str, Any, str]]:
    """(dotted name, value, description) of every field of `config`, in order."""
    rows = []

    def walk(node: ConfigDict, prefix: str) -> None:
        for k, v in node.items():
            name = prefix + k
            if isinstance(v, ConfigDict):
                walk(v, name + ".")
            else:
                rows.append((name, v, docs.get(name, "")))

    walk(config, "")
    return rows


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
            where = [f"{'.'.join([*parts[:-1], k, leaf])}" for k, v in node.items()
                     if isinstance(v, ConfigDict) and leaf in v]
            hint = f" (did you mean {' or '.join(where)}?)" if where else ""
            raise KeyError(f"--set {key}: no field {leaf!r}{hint}; fields here: "
                           f"{sorted(node.keys())}")
        cur = node[leaf]
        if isinstance(cur, ConfigDict):
            raise KeyError(f"--set {key}: {key!r} is a section; set one of its fields: "
                           f"{sorted(cur.keys())}")
        try:
            val = _parse_value(text, cur)
        except ValueError as e:
            raise ValueError(f"--set {key}={text}: {e}") from None
        if cur is not None and val is not None and not isinstance(val, type(cur)) and not (
                isinstance(cur, float) and isinstance(val, int)):
            raise TypeError(f"--set {key}={text}: expected a {type(cur).__name__} "
                            f"(current value {cur!r}), got {type(val).__name__}")
        with node.ignore_type():
            node[leaf] = val
    return config


# ---------------------------------------------------------------- train and evaluate


def cached_json(run: Run | None, name: str, compute: Callable[[], dict]) -> dict:
    """`compute()`, kept in the run directory as `name` and read back on later calls."""
    if run is not None and (run.path / name).exists():
        return run.read_json(name)
    value = compute()
    if run is not None:
        run.write_json(name, value)
    return value


def default_run_dir(name: str, seed: int) -> Path:
    """runs/NAME-sSEED-YYYYmmdd-HHMMSS."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-s{seed}-{stamp}"


def build_experiment(config: ConfigDict, run: Run | None = None) -> Experiment:
    """Build an experiment (learner, samplers, outer loop) from its config."""
    mod = load_module(config.experiment)
    return mod.build(config, run)


def read_config(run: Run) -> ConfigDict:
    """The config of a run directory (runs of older versions upgraded to today's fields)."""
    if not (run.path / "config.json").exists():
        made_in_python = (run.checkpoint_dir.exists() and any(run.checkpoint_dir.iterdir()))
        raise FileNotFoundError(
            f"{run.path} has checkpoints but no config.json: it was made from Python with "
            "OuterLoop.run, so the CLI cannot rebuild its learner and samplers; restore it in "
            "Python with metalearn.checkpoint.Checkpointer(RUN/'checkpoints')"
            ".restore(outer.init(learner, sampler, key))" if made_in_python else
            f"{run.path} is not a metalearn run directory (no config.json); pass the --run-dir "
            "of a `metalearn train` run")
    d = run.read_json("config.json")
    d["outer"] = upgrade_outer(d["outer"])
    return ConfigDict(d)


def run_config(name: str, sets: Sequence[str] = (), seed: int | None = None,
               run_dir: str | Path | None = None, resume: bool = False) -> tuple[Path, ConfigDict]:
    """The run directory and config of a new run, or of the run in `run_dir` to resume.

    Overrides are applied and checked; the outer loop's unused section is dropped, so a run's
    config holds what it uses. Nothing is written.
    """
    if resume:
        if run_dir is None:
            raise ValueError("--resume needs --run-dir, the run directory to continue")
        path = Path(run_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"cannot resume: {path / 'config.json'} does not exist; "
                                    "is this a run directory made by `metalearn train`?")
        config = read_config(Run(path, create=False))
        if name and name != config.experiment:
            raise ValueError(f"{path} is a run of {config.experiment!r}, not {name!r}")
    else:
        config = load_module(name).get_config()
        config.experiment = name
        if seed is not None:
            config.seed = seed
        path = Path(run_dir) if run_dir else None
    apply_overrides(config, sets)
    check_outer_sets(config.outer, sets)
    build_outer(config.outer, config.steps)  # its own checks (names, ranges), before any work
    config.outer = used_outer(config.outer)
    return path or default_run_dir(name, config.seed), config


def train(name: str, sets: Sequence[str] = (), seed: int | None = None,
          run_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True, from_step: int | None = None) -> tuple[Run, dict]:
    """Train experiment `name` (or resume the run in `run_dir`); returns (run, summary).

    A resume continues from the latest checkpoint, or from `from_step`'s. It changes nothing
    in the run directory before training starts, and config.json only once it has finished.
    A new run refuses a directory where another run has trained."""
    if from_step is not None and not resume:
        raise ValueError("--from-step goes with --resume: it picks the checkpoint to resume from")
    path, config = run_config(name, sets, seed, run_dir, resume)
    if not resume and path.is_dir() and Run(path, create=False).holds_a_run():
        raise FileExistsError(
            f"{path} already holds a run (metrics.jsonl or checkpoints/); continue it with "
            f"`metalearn train --run-dir {path} --resume`, or choose a new --run-dir (or "
            "delete that one)")
    run = Run(path)
    if progress:
        print(f"run directory: {run.path}", flush=True)
    exp = build_experiment(config, run)
    if not resume:  # a resume rewrites config.json only once it has trained (below)
        run.write_json("config.json", config.to_dict())
    run.write_json("tasks.json", {k: s.describe() for k, s in exp.splits.items()})
    result = meta_train(config, exp, run, resume, progress, from_step)
    if resume:
        run.write_json("config.json", config.to_dict())
    summary = summarize_run(config, exp, run, result, progress)
    run.write_json("summary.json", summary)
    return run, summary


def meta_train(config: ConfigDict, exp: Experiment, run: Run, resume: bool = False,
               progress: bool = True, from_step: int | None = None):
    """Run the config's outer loop on the experiment; returns its `TrainResult`."""
    from metalearn.outer.base import RunOptions

    split = exp.eval_split
    return build_outer(config.outer, config.steps).run(
        exp.learner, exp.train, jax.random.PRNGKey(config.seed), steps=config.steps,
        eval_sampler=exp.splits.get(split) if split else None, run_dir=run.path,
        config=config.to_dict(), resume=resume, resume_step=from_step,
        options=RunOptions(eval_every=config.eval_every, eval_episodes=config.eval_episodes,
                           eval_batch_size=config.eval_batch_size,
                           checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                           progress=progress),
        eval_learner=exp.eval_learner)


def summarize_run(config: ConfigDict, exp: Experiment, run: Run | None, result: Any,
                  progress: bool = False) -> dict:
    """summary.json: speed, final train loss, the last evaluation, the test split, the report."""
    summary: dict[str, Any] = {"experiment": config.experiment, "steps": config.steps,
                               "seed": config.seed,
                               "steps_per_second": result.steps_per_second}
    train_recs = [r for r in result.history if r.get("split") == "train"]
    if train_recs:
        summary["final_train_loss"] = float(np.mean([r["loss"] for r in train_recs[-50:]]))
    split = exp.eval_split
    if result.final_eval is not None and split != "test":
        summary[split] = result.final_eval
    if "test" in exp.splits:
        summary["test"] = evaluate_split(config, exp, result.meta,
                                          progress="test" if progress else None)
    if exp.report is not None:
        summary.update(exp.report(exp, result.meta, run, config, progress=progress))
    return summary


def evaluate_split(config: ConfigDict, exp: Experiment, meta: MetaParams, seed: int = 0,
                    episodes: int | None = None, sampler: TaskSampler | None = None,
                    progress: str | None = None) -> dict:
    """The run's test figures (or `sampler`'s): `test_episodes` episodes from the test seed."""
    key = jax.random.PRNGKey(TEST_SEED)
    if seed:
        key = jax.random.fold_in(key, seed)
    return evaluate(exp.evaluator, meta, sampler or exp.splits["test"], key,
                    episodes or config.test_episodes, config.eval_batch_size, progress=progress)


def load_trained(run_dir: str | Path, step: int | None = None) -> tuple[ConfigDict, Experiment,
                                                                        MetaParams, int]:
    """(config, experiment, meta-parameters, step) of a trained run, from its checkpoint."""
    run = Run(run_dir, create=False)
    config = read_config(run)
    exp = build_experiment(config, run)
    outer = build_outer(config.outer, config.steps)
    template = outer.init(exp.learner, exp.train, jax.random.PRNGKey(config.seed))
    with Checkpointer(run.checkpoint_dir, max_to_keep=None, create=False) as ckpt:
        if ckpt.latest_step() is None:
            raise CheckpointError(f"no checkpoint in {run.checkpoint_dir}: the run stopped "
                                  "before its first checkpoint (or was never trained)")
        done, state = ckpt.restore(template, step)
    state = jax.tree.map(jax.numpy.asarray, state)
    return config, exp, outer.meta_params(state), done


def evaluate_run(run_dir: str | Path, split: str = "test", episodes: int | None = None,
                 seed: int = 0, ways: int | None = None, shots: int | None = None,
                 queries: int | None = None, unlabeled: int | None = None,
                 progress: bool = False) -> dict:
    """Evaluate a trained run on one of its splits; saves eval_SPLIT.json in the run.

    With the defaults (`episodes`: the run's `test_episodes`, `seed` 0) the test split gives
    exactly the figures `metalearn train` reported. `ways`, `shots`, `queries`, `unlabeled`
    (None keeps the run's) evaluate few-shot runs at another N-way K-shot setting, e.g. with
    unlabeled images for semi-supervised learners; the result goes to
    eval_SPLIT_<setting>.json, next to (not over) the default one."""
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
    res = evaluate_split(config, exp, meta, seed, episodes, sampler,
                          progress=split if progress else None)
    res = {"split": split, "step": step, "seed": seed, **res}
    if setting:
        res["setting"] = {k: getattr(sampler, k) for k in ("ways", "shots", "queries",
                                                            "unlabeled")}
    Run(run_dir, create=False).write_json(name, res)
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
    res = evaluate_episodes(exp.evaluator, meta, episodes, jax.random.PRNGKey(MANIFEST_SEED))
    res = {"split": f"manifest:{manifest.name}", "step": step, **res}
    Run(run_dir, create=False).write_json(f"eval_manifest_{manifest.stem}.json", res)
    return res

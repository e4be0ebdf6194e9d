"""Training an experiment from its config: the run directory, the outer loop, the summary.

`train(name, sets)` is what `metalearn train` runs: it resolves the experiment, applies the
overrides, builds the outer loop once (its checks run before any work), meta-trains with
`metalearn.outer.driver`, then evaluates the test split and the experiment's report into
summary.json. A resume continues a run directory from its newest (or a chosen) checkpoint.
"""

from __future__ import annotations

import datetime
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from metalearn.config import ConfigDict, apply_overrides, base_config
from metalearn.core import InnerLearner, MetaParams, TaskSampler
from metalearn.discovery import (
    experiment_module,
    import_experiment,
    resolve_experiment,
)
from metalearn.evaluation import episode_values, evaluate
from metalearn.experiment import Experiment
from metalearn.messages import arg, in_cli, override
from metalearn.outer.registry import build_outer, check_outer_sets, upgrade_outer, used_outer
from metalearn.runs import Run
from metalearn.seeds import TEST_SEED

if TYPE_CHECKING:
    from metalearn.outer.base import OuterLoop
    from metalearn.reload import LoadedRun


def default_run_dir(name: str, seed: int) -> Path:
    """runs/NAME-sSEED-YYYYmmdd-HHMMSS."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-s{seed}-{stamp}"


def build_experiment(config: ConfigDict, run: Run | None = None) -> Experiment:
    """Build an experiment (learner, samplers) from its config."""
    return experiment_module(config).build(config, run)


def read_config(run: Run) -> ConfigDict:
    """The config of a run directory (runs of older versions upgraded to today's fields)."""
    if not (run.path / "config.json").exists():
        raise FileNotFoundError(
            f"{run.path} is not a metalearn run directory (no config.json); give the run "
            "directory of a `metalearn train` or `OuterLoop.run(run_dir=...)` run")
    return ConfigDict(upgrade_config(run.read_json("config.json")))


def upgrade_config(d: dict) -> dict:
    """A run's recorded config in today's form: the one place where runs made by earlier
    versions (and Python runs, which record only the base fields they set) are brought up to
    date."""
    d = {**base_config().to_dict(), **d}
    d["outer"] = upgrade_outer(d["outer"])  # before the per-loop sections
    if d.get("experiment") and not d.get("experiment_source"):  # before the source was kept
        d["experiment_source"] = resolve_experiment(d["experiment"])[1]
    if d.get("experiment_source"):
        # fields the experiment gained since the run was made, at their defaults (a new
        # field's default keeps the old behaviour), so that `--resume --set NEW=...` works
        defaults = import_experiment(d["experiment_source"]).get_config().to_dict()
        d = _with_missing(d, defaults)
    return d


def _with_missing(d: dict, defaults: dict) -> dict:
    """`d` with the keys of `defaults` it lacks (recursively in sections both have)."""
    out = dict(d)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict) and k != "outer":
            out[k] = _with_missing(out[k], v)
    return out


QUICK_STEPS = 20
QUICK_EPISODES = 20


def quick_sets(config: ConfigDict, module: Any = None) -> list[str]:
    """The overrides of a quick run (`--quick`): a smoke test of the whole pipeline.

    A few meta-steps, no periodic evaluation or checkpoints but the last, a few final test and
    report episodes, plus the experiment's own `QUICK` overrides (a module-level dict, e.g. a
    narrower network or a cheaper report) where its defaults are slow to even compile. Settings
    given with `--set` come after these and win."""
    sets = {"steps": min(config.steps, QUICK_STEPS), "eval_every": 0, "checkpoint_every": 0,
            "eval_episodes": min(config.eval_episodes, QUICK_EPISODES),
            "test_episodes": min(config.test_episodes, QUICK_EPISODES)}
    if "report_episodes" in config:
        sets["report_episodes"] = min(config.report_episodes, QUICK_EPISODES)
    sets.update(getattr(module, "QUICK", {}))
    return [f"{k}={v}" for k, v in sets.items()]


def run_config(name: str, sets: Sequence[str] = (), seed: int | None = None,
               run_dir: str | Path | None = None, resume: bool = False, quick: bool = False
               ) -> tuple[Path, ConfigDict, OuterLoop]:
    """The run directory, config and outer loop of a new run, or of the run in `run_dir` to
    resume.

    Overrides are applied and checked, and the outer loop is built (its own checks of names
    and ranges run before any work); the outer loop's unused sections are dropped, so a run's
    config holds what it uses. Nothing is written.
    """
    if resume:
        if run_dir is None:
            raise ValueError(f"{arg('resume')} needs {arg('run_dir')}, the run directory to "
                             "continue")
        path = Path(run_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"cannot resume: {path / 'config.json'} does not exist; "
                                    "is this a run directory made by `metalearn train`?")
        config = read_config(Run(path, create=False))
        if not config.get("experiment"):
            raise ValueError(f"cannot resume {path} here: it was made from Python "
                             "(OuterLoop.run), not from an experiment; resume it in Python "
                             "with outer.run(..., run_dir=..., resume=True)")
        if name and resolve_experiment(name)[1] != config.experiment_source:
            raise ValueError(f"{path} is a run of {config.experiment!r} "
                             f"({config.experiment_source}), not {name!r}")
        if quick:
            raise ValueError(f"{arg('quick')} starts a new run; a resume continues the run's "
                             "own settings")
    else:
        name, source = resolve_experiment(name)
        module = import_experiment(source)
        config = module.get_config()
        config.experiment, config.experiment_source = name, source
        if seed is not None:
            config.seed = seed
        path = Path(run_dir) if run_dir else None
        if quick:
            sets = [*quick_sets(config, module), *sets]
    apply_overrides(config, sets)
    check_outer_sets(config.outer, sets)
    outer = build_outer(config.outer, config.steps)
    config.outer = used_outer(config.outer)
    return path or default_run_dir(name, config.seed), config, outer


def train(name: str, sets: Sequence[str] = (), seed: int | None = None,
          run_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True, from_step: int | None = None,
          quick: bool = False) -> tuple[Run, dict]:
    """Train experiment `name` (or resume the run in `run_dir`); returns (run, summary).

    `quick` makes it a smoke run of a minute or less (`quick_sets`: 20 steps, 20 test and
    report episodes, the experiment's `QUICK` overrides), `sets` still applying on top.

    A resume continues from the latest checkpoint, or from `from_step`'s. It changes nothing
    in the run directory before training starts, and config.json only once it has finished.
    A new run refuses a directory where another run has trained."""
    if from_step is not None and not resume:
        raise ValueError(f"{arg('from_step')} goes with {arg('resume')}: it picks the "
                         "checkpoint to resume from")
    path, config, outer = run_config(name, sets, seed, run_dir, resume, quick)
    if not resume and path.is_dir() and Run(path, create=False).holds_a_run():
        cont = (f"`metalearn train --run-dir {path} --resume`" if in_cli() else
                f"train(run_dir={str(path)!r}, resume=True)")
        raise FileExistsError(
            f"{path} already holds a run (metrics.jsonl or checkpoints/); continue it with "
            f"{cont}, or choose a new run directory ({arg('run_dir')}) or delete that one")
    made = not path.exists()
    run = Run(path)
    if progress:
        print(f"run directory: {run.path}", flush=True)
    try:
        exp = build_experiment(config, run)
    except BaseException:
        if made:  # a check that failed while building leaves no directory behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    tasks = {k: s.describe() for k, s in exp.splits.items()}
    if not resume:  # a resume rewrites config.json and tasks.json once it has trained (below)
        run.write_json("config.json", config.to_dict())
        run.write_json("tasks.json", tasks)
    try:
        result = meta_train(config, exp, run, outer, resume, progress, from_step)
        if resume:
            run.write_json("config.json", config.to_dict())
            run.write_json("tasks.json", tasks)
        if progress and (plan := final_episodes(config, exp)):
            print(plan, flush=True)
        summary = summarize_run(config, exp, run, result, progress)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(run, config.steps)) from None
    run.write_json("summary.json", summary)
    return run, summary


def final_episodes(config: ConfigDict, exp: Experiment) -> str:
    """What the final evaluation will run, said before it starts (it can take longer than a
    short training): the test episodes and, where the config has them, the report's."""
    parts, total = [], 0
    if "test" in exp.splits:
        parts.append(f"test {config.test_episodes} episodes")
        total += config.test_episodes
    if exp.report is not None and exp.report_plan is not None:
        words, n = exp.report_plan(config)
        if n:
            parts.append(words)
            total += n
    if not parts:
        return ""
    return f"final evaluation: {' + '.join(parts)} ({total} episodes)"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `train`: its message says where the run stands and how to continue."""


def interrupted_message(run: Run, steps: int) -> str:
    """Where an interrupted run stands: the step its metrics reached, its newest checkpoint
    and the command (or call) that continues it."""
    ckpts = sorted(int(p.name) for p in run.checkpoint_dir.glob("*") if p.name.isdigit()) \
        if run.checkpoint_dir.is_dir() else []
    reached = max((r["step"] for r in run.metrics() if r.get("split") == "train"), default=0)
    cont = (f"`metalearn train --run-dir {run.path} --resume`" if in_cli() else
            f"train(run_dir={str(run.path)!r}, resume=True)")
    if not ckpts:
        return (f"interrupted at step {reached} of {steps}, before the first checkpoint: "
                f"nothing to resume; start again with a new run directory or delete {run.path}")
    what = ("training had finished; the final evaluation did not" if ckpts[-1] >= steps else
            f"its last checkpoint is step {ckpts[-1]}")
    return (f"interrupted at step {reached} of {steps} ({what}, in {run.checkpoint_dir}); "
            f"continue with {cont}")


def meta_train(config: ConfigDict, exp: Experiment, run: Run, outer: OuterLoop,
               resume: bool = False, progress: bool = True, from_step: int | None = None):
    """Run the outer loop on the experiment as the config says; returns its `TrainResult`."""
    from metalearn.outer.driver import RunOptions
    from metalearn.outer.driver import run as drive

    split = exp.eval_split
    init = None if resume else initial_meta_from(config.get("init_from", ""), exp.learner)
    return drive(
        outer, exp.learner, exp.train, jax.random.PRNGKey(config.seed), steps=config.steps,
        eval_sampler=exp.splits.get(split) if split else None, run_dir=run.path,
        config=config.to_dict(), resume=resume, from_step=from_step,
        options=RunOptions(eval_every=config.eval_every, eval_episodes=config.eval_episodes,
                           eval_batch_size=config.eval_batch_size,
                           checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                           progress=progress),
        eval_learner=exp.eval_learner, init_meta=init)


def initial_meta_from(spec: str, learner: InnerLearner) -> MetaParams | None:
    """The meta-parameters `init_from` names: None for "", a run directory's trained ones, or
    one the learner offers by name (`learner.named_meta(name)`)."""
    if not spec:
        return None
    if Path(spec).is_dir():
        from metalearn.reload import load_run

        return load_run(spec).meta
    named = learner.named_meta(spec)
    if named is None:
        raise ValueError(f"{override('init_from', spec)}: {spec!r} is not a run directory, and "
                         f"{type(learner).__name__} offers no named meta-parameters")
    return named


def summarize_run(config: ConfigDict, exp: Experiment, run: Run | None, result: Any,
                  progress: bool = False) -> dict:
    """summary.json: speed, final train loss, the last evaluation, the test split, the report."""
    from metalearn.outer.driver import training_summary

    summary: dict[str, Any] = {"experiment": config.experiment, "steps": config.steps,
                               "seed": config.seed, **training_summary(result)}
    split = exp.eval_split
    if result.final_eval is not None and split != "test":
        summary[split] = result.final_eval
    if "test" in exp.splits:
        summary["test"] = evaluate_split(config, exp, result.meta,
                                          progress="test" if progress else None)
    if exp.report is not None:
        summary.update(exp.report(exp, result.meta, run, config, progress=progress))
    return summary


def evaluate_split(config: ConfigDict, exp: Experiment | LoadedRun, meta: MetaParams,
                    seed: int = 0, episodes: int | None = None,
                    sampler: TaskSampler | None = None, progress: str | None = None,
                    learner: InnerLearner | None = None, per_episode: bool = False) -> dict:
    """The run's test figures (or `sampler`'s): `test_episodes` episodes from the test seed,
    scored by the run's evaluator (or by `learner`, e.g. a baseline, on the same episodes);
    `per_episode`: each episode's metrics (`episode_values`) instead of their summary."""
    key = jax.random.PRNGKey(TEST_SEED)
    if seed:
        key = jax.random.fold_in(key, seed)
    fn = episode_values if per_episode else evaluate
    return fn(learner or exp.evaluator, meta, sampler or exp.splits["test"], key,
              episodes or config.test_episodes, config.eval_batch_size, progress=progress)

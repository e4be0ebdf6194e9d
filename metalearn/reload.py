"""Runs made from Python and reloading any run: what config.json records for an
`OuterLoop.run(run_dir=...)` run, `load_run` (learner, samplers, meta-parameters back from a run
directory), and the evaluations of a saved run that `metalearn evaluate` offers (a split, another
few-shot setting, a dataset of your own, a manifest of fixed episodes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metalearn.checkpoint import Checkpointer, CheckpointError
from metalearn.config import ConfigDict
from metalearn.core import InnerLearner, MetaParams, TaskSampler
from metalearn.evaluation import paired_difference, summarize
from metalearn.experiment import Experiment
from metalearn.messages import arg, in_cli, option
from metalearn.outer.driver import key_from_spec
from metalearn.outer.registry import CustomObjectError, build_outer
from metalearn.runs import Run
from metalearn.seeds import MANIFEST_SEED
from metalearn.specs import rebuild
from metalearn.training import build_experiment, evaluate_split, read_config

# the episode settings a result's "setting" records, where its sampler has them
SETTINGS = ("ways", "shots", "queries", "unlabeled", "within_group")

# ---------------------------------------------------------------- reloading runs


class LoadedRun(NamedTuple):
    """A trained run reloaded by `load_run`: its learner, meta-parameters and config."""

    path: Path
    config: ConfigDict
    learner: InnerLearner
    meta: MetaParams
    step: int  # the meta-step of the checkpoint
    splits: dict[str, TaskSampler]  # an experiment's splits; a Python run's train / eval
    experiment: Experiment | None  # None for a run made from Python
    evaluator: InnerLearner  # scores evaluations (the experiment's eval_learner, else learner)

    @property
    def default_split(self) -> str:
        """The split `evaluate` reads by default: test, else the run's evaluation split."""
        split = next((s for s in ("test", "validation", "eval") if s in self.splits), None)
        if split is None:
            raise ValueError(f"{self.path} has no held-out split to evaluate (its splits: "
                             f"{sorted(self.splits) or 'none'}); choose one ({arg('split')})"
                             + ("" if in_cli() else
                                " or reload it with load_run(..., samplers={'test': ...})"))
        return split

    def split_sampler(self, split: str | None = None) -> tuple[str, TaskSampler]:
        """(name, sampler) of one of the run's splits (default: `default_split`)."""
        split = split or self.default_split
        if split not in self.splits:
            raise ValueError(f"split {split!r} not available for {self.path}; choose one of "
                             f"{sorted(self.splits)}")
        return split, self.splits[split]

    def evaluate(self, split: str | None = None, episodes: int | None = None, seed: int = 0,
                 sampler: TaskSampler | None = None, progress: str | None = None) -> dict:
        """Figures on one of the run's splits (default: test) or on `sampler`: the episodes of
        the test seed, so that seed 0 repeats what `metalearn train` reported."""
        sampler = sampler or self.split_sampler(split)[1]
        return evaluate_split(self.config, self, self.meta, seed, episodes, sampler, progress)


def load_run(path: str | Path, step: int | None = None, *, learner: InnerLearner | None = None,
             sampler: TaskSampler | None = None, outer: Any = None,
             samplers: dict[str, TaskSampler] | None = None) -> LoadedRun:
    """Reload a trained run (made by `metalearn train` or `OuterLoop.run(run_dir=...)`).

    The learner, samplers and outer loop are rebuilt from the run's config: an experiment's by
    its `build`, a Python run's from the specs config.json records (a `FewShotSampler` on
    images read from files is rebuilt by reading them again). What cannot be rebuilt (a class
    defined in a script, an optax or evosax object, data made in memory) is passed here:
    `learner`, `sampler` (the training sampler, for the shapes of the meta-parameters),
    `samplers` (samplers by split name, e.g. {"eval": test}: they replace or add splits) or
    `outer`. `step` picks a checkpoint (default: the latest).
    """
    samplers = dict(samplers or {})
    if sampler is not None:
        samplers.setdefault("train", sampler)
    sampler = samplers.get("train")
    run = Run(path, create=False)
    config = read_config(run)
    if config.get("experiment"):
        exp = build_experiment(config, run)
        learner = learner or exp.learner
        splits = dict(exp.splits)
        evaluator = exp.eval_learner or learner.for_evaluation()
        key = jax.random.PRNGKey(config.seed)
    else:
        exp = None
        learner = learner or _rebuild(config, "learner", run.path, "learner")
        splits = {}
        for name, spec in config.samplers.to_dict().items():
            if name in samplers or spec is None:
                continue
            try:
                splits[name] = rebuild(spec)
            except ValueError as e:
                if name == "train":
                    raise _not_rebuildable(run.path, "train sampler", "sampler", e) from None
        evaluator = learner.for_evaluation()
        if config.get("eval_learner"):
            try:
                evaluator = rebuild(config.eval_learner.to_dict())
            except ValueError:
                pass  # scored with the learner itself
        key = key_from_spec(config.key.to_dict())
    splits.update(samplers)
    if outer is None:
        try:
            outer = build_outer(config.outer, config.steps)
        except CustomObjectError as e:
            raise _not_rebuildable(run.path, "outer loop", "outer", e) from None
    template = outer.init(learner, splits.get("train") or sampler, key)
    with Checkpointer(run.checkpoint_dir, max_to_keep=None, create=False) as ckpt:
        if ckpt.latest_step() is None:
            raise CheckpointError(f"no checkpoint in {run.checkpoint_dir}: the run stopped "
                                  "before its first checkpoint (or was never trained)")
        done, state = ckpt.restore(template, step)
    state = jax.tree.map(jnp.asarray, state)
    return LoadedRun(run.path, config, learner, outer.meta_params(state), done, splits, exp,
                     evaluator)


def _rebuild(config: ConfigDict, field: str, path: Path, arg_name: str) -> Any:
    try:
        return rebuild(config[field].to_dict())
    except ValueError as e:
        raise _not_rebuildable(path, field, arg_name, e) from None


def _not_rebuildable(path: Path, what: str, arg_name: str, why: Exception) -> ValueError:
    return ValueError(
        f"{path} was made from Python and its {what} cannot be rebuilt from config.json: "
        f"{why}. Reload it in Python, passing the object: metalearn.load_run({str(path)!r}, "
        f"{arg_name}=...)" + (" (the command line cannot)" if in_cli() else ""))


def evaluate_run(run_dir: str | Path, split: str | None = None, episodes: int | None = None,
                 seed: int = 0, *, progress: bool = False, dataset: str | Path | None = None,
                 on_error: str = "raise", baselines: bool = True,
                 against: Sequence[str | Path] = (), inner_steps: int | None = None,
                 **settings: Any) -> dict:
    """Evaluate a trained run on one of its splits (default: test, else the run's evaluation
    split), or on a dataset of your own; saves eval_SPLIT.json in the run.

    With the defaults (`episodes`: the run's `test_episodes`, `seed` 0) the test split gives
    exactly the figures `metalearn train` reported. `settings` change the split sampler's
    episode settings by name (its `replace`): for few-shot samplers `ways`, `shots`, `queries`,
    `unlabeled` (e.g. for semi-supervised learners) and `within_group` (each episode's classes
    from one group, e.g. an alphabet); the result goes to eval_SPLIT_<setting>.json, next to
    (not over) the default one.

    `dataset` draws the episodes from a dataset of yours instead (the sampler's `for_dataset`;
    few-shot image runs: an image folder or zip, IDX files "IMAGES,LABELS" or a .npz with x and
    y, converted to the run's image size and channels and preprocessed as the `split` sampler's
    images); the result goes to eval_dataset_<NAME>[_<setting>].json (NAME: the dataset's
    folder or file stem), with the dataset's spec and class count; `on_error="skip"` leaves out
    its files that are not readable images.

    An experiment with `baselines` (e.g. the learned-rule experiments: SGD and Adam at the rates
    tuned on training tasks) also scores those on the same episodes, under "baselines" in the
    result; `baselines=False` leaves them out. `against` names other runs whose learners are
    scored on the same episodes too (their split must draw the same episodes: the same data,
    split and preprocessing), under "against". Each of these carries "difference": this run's
    metrics minus theirs, episode by episode, with its 95% CI (`paired_difference`).

    `inner_steps` scores every learner (this run's, the baselines, `against`) after that many
    inner steps instead of its own (learners with an `inner_steps` field: a learned rule, MAML,
    the SGD/Adam baselines), e.g. 10 x the meta-training unroll; the result goes to
    eval_SPLIT_steps<N>.json."""
    if inner_steps is not None and inner_steps < 1:
        raise ValueError(f"inner_steps={inner_steps}: must be at least 1 (omit it for the "
                         "learners' own)")
    settings = {k: v for k, v in settings.items() if v is not None}
    loaded = load_run(run_dir)
    split, sampler = loaded.split_sampler(split)
    name = f"eval_{split}.json"
    what = loaded.config.get("experiment") or "this run"
    data_info, label = None, split
    try:
        if dataset is not None:
            sampler, data_info = sampler.for_dataset(dataset, on_error, **settings)
            label = f"dataset:{data_info['name']}"
            name = f"eval_dataset_{data_info['name']}.json"
        elif settings:
            sampler = sampler.replace(**settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the {split} sampler of {what}: {e}") from None
    if settings:
        try:  # the learner's own shape checks (e.g. a MAML head narrower than the ways)
            loaded.evaluator.init(jax.random.PRNGKey(0), sampler.example())
        except ValueError as e:
            given = ", ".join(option(k, v) for k, v in settings.items())
            raise ValueError(f"{what} cannot be evaluated with {given}: {e}") from None
        name = f"{name.removesuffix('.json')}_{sampler.setting_tag()}.json"
    others = {"against": _against(loaded, split, against)}
    exp = loaded.experiment
    if baselines and exp is not None and exp.baselines is not None:
        others["baselines"] = exp.baselines(exp, Run(run_dir, create=False), loaded.config,
                                            progress=progress)
    evaluator = loaded.evaluator
    if inner_steps is not None:
        evaluator = _with_inner_steps(evaluator, inner_steps, what)
        others = {g: {b: (_with_inner_steps(lrn, inner_steps, b), m)
                      for b, (lrn, m) in learners.items()} for g, learners in others.items()}
        name = f"{name.removesuffix('.json')}_steps{inner_steps}.json"

    def values(learner: InnerLearner, meta: MetaParams, who: str | None = None) -> dict:
        return evaluate_split(loaded.config, loaded, meta, seed, episodes, sampler,
                              (label + (f": {who}" if who else "")) if progress else None,
                              learner=learner, per_episode=True)

    mine = values(evaluator, loaded.meta)
    res = {"split": label, "step": loaded.step, "seed": seed, **summarize(mine)}
    if inner_steps is not None:
        res["inner_steps"] = inner_steps
    for group, learners in others.items():
        for b, (b_learner, b_meta) in learners.items():
            theirs = values(b_learner, b_meta, b)
            res.setdefault(group, {})[b] = {**summarize(theirs),
                                            "difference": paired_difference(mine, theirs)}
    if settings:
        res["setting"] = {k: getattr(sampler, k) for k in dict.fromkeys([*SETTINGS, *settings])
                          if hasattr(sampler, k)}
    if data_info is not None:
        res["dataset"] = {**data_info, "sampler_of": split}
    Run(run_dir, create=False).write_json(name, res)
    return res


def _with_inner_steps(learner: InnerLearner, steps: int, who: str) -> InnerLearner:
    """`learner` taking `steps` inner steps; an error naming `who` if it has no such field."""
    if not (dataclasses.is_dataclass(learner) and "inner_steps" in
            {f.name for f in dataclasses.fields(learner)}):
        raise ValueError(f"{who}: its learner ({type(learner).__name__}) takes no inner steps "
                         "(no inner_steps field); evaluate it without --inner-steps")
    return dataclasses.replace(learner, inner_steps=steps)


def _against(loaded: LoadedRun, split: str, runs: Sequence[str | Path]) -> dict:
    """{run directory: (evaluator, meta)} of other runs whose `split` sampler draws the same
    episodes as `loaded`'s (the same data, split and preprocessing)."""
    out = {}
    mine = loaded.splits[split].describe()
    for path in runs:
        other = load_run(path)
        if split not in other.splits:
            raise ValueError(f"--against {path}: that run has no {split!r} split (its splits: "
                             f"{sorted(other.splits)}); compare runs of one protocol")
        theirs = other.splits[split].describe()
        if theirs != mine:
            diff = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k))
            raise ValueError(f"--against {path}: its {split} episodes differ from this run's "
                             f"(in {', '.join(diff)}); compare runs trained on the same tasks")
        out[str(path)] = (other.evaluator, other.meta)
    return out


def evaluate_manifest(run_dir: str | Path, manifest: str | Path, split: str = "test") -> dict:
    """Evaluate a trained run on the fixed episodes of a manifest file.

    The episodes' images are read and preprocessed by the run's own `split` sampler, so they
    go through exactly the training preprocessing. Saves eval_manifest_NAME.json in the run.
    """
    from metalearn.evaluation import evaluate_episodes

    manifest = Path(manifest)
    if not manifest.exists():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    loaded = load_run(run_dir)
    sampler = loaded.splits.get(split, loaded.splits.get("train"))
    try:
        episodes = sampler.episodes_from_manifest(manifest)
    except ValueError as e:
        raise ValueError(f"the samplers of {loaded.config.get('experiment') or run_dir!r}: "
                         f"{e}") from None
    res = evaluate_episodes(loaded.evaluator, loaded.meta, episodes,
                            jax.random.PRNGKey(MANIFEST_SEED))
    res = {"split": f"manifest:{manifest.name}", "step": loaded.step, **res}
    Run(run_dir, create=False).write_json(f"eval_manifest_{manifest.stem}.json", res)
    return res

"""The experiment contract: what an experiment module defines and returns.

An experiment is a module (built in, yours, or registered by a package; see
`metalearn.discovery`) with a one-line docstring and two functions:

    get_config() -> ml_collections.ConfigDict     # every field overridable with --set key=value
    build(config, run: Run | None) -> Experiment  # learner and samplers per split

and optionally a `DOCS` dict (dotted field name -> one-line description, shown by
`metalearn config NAME`). `get_config` starts from `base_config(...)` (steps, seed, evaluation,
checkpoints, and the outer loop's section, `outer_config(...)`). `build` must be cheap: it runs
again for every `metalearn evaluate`, so work such as fitting a baseline is done once and kept
in the run directory (`cached_json`). The experiment may set `Experiment.report`, called after
training with the run's config, for extra headline figures in summary.json.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from metalearn.config import ConfigDict, base_config
from metalearn.core import InnerLearner, TaskSampler
from metalearn.outer.registry import outer_config
from metalearn.runs import Run

__all__ = ["ConfigDict", "Experiment", "base_config", "cached_json", "comma_list", "outer_config"]


@dataclasses.dataclass
class Experiment:
    """What an experiment's `build` returns."""

    learner: InnerLearner
    splits: dict[str, TaskSampler]  # at least "train"; "validation"/"test" for held-out tasks
    # scores evaluations when given (same meta-parameters as `learner`, e.g. extra metrics);
    # else `learner.for_evaluation()` does
    eval_learner: InnerLearner | None = None
    # extra headline figures: report(exp, meta, run, config, progress=...) -> dict for summary.json
    report: Callable[..., dict] | None = None
    # what the report will run, said before it starts: report_plan(config) -> (words, episodes)
    report_plan: Callable[[ConfigDict], tuple[str, int]] | None = None
    # learners `metalearn evaluate` scores beside the trained one, on the same episodes (e.g.
    # SGD/Adam at tuned rates): baselines(exp, run, config, progress=...) -> {name: (learner,
    # meta)}, each of the trained learner's episode shapes
    baselines: Callable[..., dict[str, tuple[InnerLearner, Any]]] | None = None

    @property
    def evaluator(self) -> InnerLearner:
        """The learner that scores evaluations: `eval_learner`, else `learner.for_evaluation()`."""
        return self.eval_learner or self.learner.for_evaluation()

    @property
    def train(self) -> TaskSampler:
        """The meta-training sampler."""
        return self.splits["train"]

    @property
    def eval_split(self) -> str | None:
        """The split evaluated during training: validation if there is one, else test."""
        return next((s for s in ("validation", "test") if s in self.splits), None)


def comma_list(value: Any) -> list[str]:
    """The non-empty, stripped items of a comma-separated config value ("a, b," -> [a, b])."""
    return [s.strip() for s in str(value).split(",") if s.strip()]


def cached_json(run: Run | None, name: str, compute: Callable[[], dict],
                key: Any = None) -> dict:
    """`compute()`, kept in the run directory as `name` and read back on later calls; given a
    JSON-able `key` (the settings it depends on), computed again when the kept one's differs."""
    if run is not None and (run.path / name).exists():
        kept = run.read_json(name)
        if key is None or kept.get("key") == json.loads(json.dumps(key)):
            return kept
    value = compute() if key is None else {**compute(), "key": key}
    if run is not None:
        run.write_json(name, value)
    return value

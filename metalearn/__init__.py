"""metalearn: meta-learning in JAX: task samplers, inner learners, gradient and evolution loops.

    import jax
    import metalearn as ml
    from metalearn import tasks

    task = tasks.LinearRegression(dim=5, num_context=10)
    outer = ml.GradientOuterLoop(learning_rate=3e-3, batch_size=32)
    result = outer.run(ml.MAML(ml.Linear()), task, jax.random.PRNGKey(0), steps=500)
    print(ml.evaluate(ml.MAML(ml.Linear()), result.meta, task, jax.random.PRNGKey(1)))

The names below are imported on first use, so `import metalearn` (and the `metalearn` command's
`--help`) stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the seams
    "Episode": "metalearn.core", "Support": "metalearn.core", "TaskSampler": "metalearn.core",
    "InnerLearner": "metalearn.core", "query_loss": "metalearn.core",
    "batch_loss": "metalearn.core", "episode_losses": "metalearn.core",
    # outer loops
    "OuterLoop": "metalearn.outer.base", "RunOptions": "metalearn.outer.driver",
    "TrainResult": "metalearn.outer.driver", "NonFiniteLossError": "metalearn.outer.driver",
    "GradientOuterLoop": "metalearn.outer.gradient",
    "EvolutionOuterLoop": "metalearn.outer.evolution",
    # learners and models
    "ProtoNet": "metalearn.learners.protonet", "MAML": "metalearn.learners.maml",
    "LSA": "metalearn.learners.lsa", "GradientDescent": "metalearn.learners.gd",
    "LeastSquares": "metalearn.learners.gd",
    "Linear": "metalearn.nn", "MLP": "metalearn.nn", "CNN": "metalearn.nn",
    # evaluation, runs, experiments
    "evaluate": "metalearn.evaluation", "evaluate_episodes": "metalearn.evaluation",
    "Run": "metalearn.runs", "Checkpointer": "metalearn.checkpoint",
    "train": "metalearn.training", "evaluate_run": "metalearn.reload",
    "load_run": "metalearn.reload", "LoadedRun": "metalearn.reload",
    "Experiment": "metalearn.experiment", "format_metrics": "metalearn.evaluation",
}
# `metalearn.compare` is the module of `metalearn compare` (its function: metalearn.compare.compare)
__all__ = sorted([*_EXPORTS, "tasks"])


def __getattr__(name: str) -> Any:
    if name == "tasks":
        return importlib.import_module("metalearn.tasks")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metalearn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

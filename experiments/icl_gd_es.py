"""Transformers learn in context by GD: the 1-layer LSA meta-trained by Sep-CMA-ES instead of Adam.

Beyond the paper: the same learner, tasks and report as `icl_gd`, but the outer loop is an
evolution strategy (evosax Sep-CMA-ES; `--set outer.evolution.strategy=CMA_ES` for the full
covariance) whose fitness is the mean query loss of a shared batch of tasks per generation. The
search starts from the very weights the gradient run of `icl_gd` starts from with the same
`--seed` (both outer loops initialise the learner from the same key).
"""

from __future__ import annotations

from metalearn.experiment import ConfigDict
from metalearn.experiments import icl_gd


def get_config() -> ConfigDict:
    """`icl_gd` with the evolution outer loop (Sep-CMA-ES, population 64, 256 tasks each)."""
    c = icl_gd.get_config()
    c.outer.kind = "evolution"
    c.outer.batch_size = 256
    return c


DOCS = icl_gd.DOCS
build = icl_gd.build  # both outer loops initialise the learner from the same key

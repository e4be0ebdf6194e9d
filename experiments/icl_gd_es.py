"""Transformers learn in context by GD: the 1-layer LSA meta-trained by Sep-CMA-ES instead of Adam.

Beyond the paper: the same learner, initialisation, tasks and report as `icl_gd`, but the outer
loop is an evolution strategy (evosax Sep-CMA-ES; `--set outer.strategy=CMA_ES` for the full
covariance) whose fitness is the mean query loss of a shared batch of tasks per generation.
"""

from __future__ import annotations

from metalearn.experiment import ConfigDict, outer_config
from metalearn.experiments import icl_gd

build = icl_gd.build


def get_config() -> ConfigDict:
    """`icl_gd` with the evolution outer loop (Sep-CMA-ES)."""
    c = icl_gd.get_config()
    c.outer = outer_config("evolution", strategy="Sep_CMA_ES", population_size=64,
                           std_init=0.05, batch_size=256, steps_per_call=100,
                           optimizer="adamw", learning_rate=1e-3, b2=0.98, clip_norm=0.001)
    return c

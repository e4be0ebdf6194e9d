"""Transformers learn in context by GD: the 1-layer LSA meta-trained by Sep-CMA-ES instead of Adam.

Beyond the paper: the same learner, tasks and report as `icl_gd`, but the outer loop is an
evolution strategy (evosax Sep-CMA-ES; `--set outer.strategy=CMA_ES` for the full covariance)
whose fitness is the mean query loss of a shared batch of tasks per generation. The search
starts from the very weights the gradient run of `icl_gd` starts from with the same `--seed`.
"""

from __future__ import annotations

import dataclasses

import jax

from metalearn.experiment import ConfigDict, Experiment, outer_config
from metalearn.experiments import icl_gd
from metalearn.runs import Run


def get_config() -> ConfigDict:
    """`icl_gd` with the evolution outer loop (Sep-CMA-ES, population 64, 256 tasks each)."""
    c = icl_gd.get_config()
    c.outer = outer_config("evolution", strategy="Sep_CMA_ES", population_size=64,
                           std_init=0.05, batch_size=256, steps_per_call=100,
                           optimizer="adamw", learning_rate=1e-3, b2=0.98, clip_norm=0.001)
    return c


def gradient_init_key(seed: int) -> tuple[int, ...]:
    """The key `GradientOuterLoop.init` passes to `learner.init` for run seed `seed`."""
    return tuple(int(v) for v in jax.random.split(jax.random.PRNGKey(seed))[0])


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """`icl_gd`'s experiment, its LSA initialised as the gradient run of the same seed."""
    exp = icl_gd.build(config, run)
    lsa = dataclasses.replace(exp.learner, init_key=gradient_init_key(config.seed))
    exp.learner = lsa
    exp.eval_learner = dataclasses.replace(exp.eval_learner, learner=lsa)
    return exp

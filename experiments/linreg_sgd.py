"""MAML / Meta-SGD on linear regression: meta-learned initialisation and inner step size."""

from __future__ import annotations

from metalearn.experiment import ConfigDict, Experiment, base_config, outer_config
from metalearn.learners.maml import MAML
from metalearn.nn import Linear
from metalearn.runs import Run
from metalearn.tasks.regression import LinearRegression


def get_config() -> ConfigDict:
    """Linear regression, d=5, 10 context points, 3 inner SGD steps, Adam outer loop."""
    c = base_config(steps=500, eval_every=100, eval_episodes=1000, test_episodes=1000,
                    checkpoint_every=250)
    c.task = ConfigDict({"dim": 5, "num_context": 10, "num_queries": 10, "input_range": 1.0,
                         "weight_scale": 0.5, "weight_mean": 1.0, "noise_std": 0.0})
    # MAML on a zero-initialised linear model; lr_mode: fixed | scalar | per_param (Meta-SGD)
    c.learner = ConfigDict({"inner_steps": 3, "inner_lr": 0.05, "lr_mode": "scalar",
                            "first_order": False})
    c.outer = outer_config("gradient", gradient={"learning_rate": 3e-3},
                           evolution={"population_size": 16, "std_init": 0.05},
                           batch_size=32, steps_per_call=25)
    return c


DOCS = {
    "task.dim": "input dimension d",
    "task.num_context": "support (context) points per task",
    "task.num_queries": "query points per task",
    "task.input_range": "inputs x ~ U(-r, r)^d",
    "task.weight_scale": "teacher weights w ~ N(weight_mean, weight_scale^2)",
    "task.weight_mean": "mean of the teacher weights",
    "task.noise_std": "Gaussian noise on the targets",
    "learner.inner_steps": "inner SGD steps on the support set",
    "learner.inner_lr": "inner step size (its initial value when learned)",
    "learner.lr_mode": "inner step size: fixed, scalar (learned) or per_param (Meta-SGD)",
    "learner.first_order": "first-order MAML: no second derivatives through the inner loop",
}


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """Learner and samplers from the config (test tasks are fresh draws from the prior)."""
    t = config.task
    train = LinearRegression(dim=t.dim, num_context=t.num_context, num_queries=t.num_queries,
                             input_range=t.input_range, weight_scale=t.weight_scale,
                             weight_mean=t.weight_mean,
                             noise_std=t.noise_std)
    learner = MAML(Linear(), **config.learner.to_dict())
    return Experiment(learner=learner, splits={"train": train, "test": train})

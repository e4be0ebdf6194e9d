"""Meta-learned initialisation and step size of inner SGD on linear regression (MAML/Meta-SGD)."""

from __future__ import annotations

from metalearn.experiment import ConfigDict, Experiment, base_config, outer_config
from metalearn.learners.inner_sgd import InnerSGD
from metalearn.runs import Run
from metalearn.tasks.regression import LinearRegression


def get_config() -> ConfigDict:
    """Linear regression, d=5, 10 context points, 3 inner SGD steps, Adam outer loop."""
    c = base_config(steps=500, eval_every=100, eval_episodes=1000, test_episodes=1000,
                    checkpoint_every=250)
    c.task = ConfigDict({"dim": 5, "num_context": 10, "num_queries": 10, "input_range": 1.0,
                         "weight_scale": 0.5, "weight_mean": 1.0, "noise_std": 0.0})
    c.learner = ConfigDict({"steps": 3, "init_lr": 0.05, "learn_lr": True,
                            "per_param_lr": False})
    c.outer = outer_config("gradient", learning_rate=3e-3, batch_size=32, steps_per_call=25,
                           population_size=16, std_init=0.05)
    return c


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """Learner and samplers from the config (test tasks are fresh draws from the prior)."""
    t = config.task
    train = LinearRegression(dim=t.dim, num_context=t.num_context, num_queries=t.num_queries,
                             input_range=t.input_range, weight_scale=t.weight_scale,
                             weight_mean=t.weight_mean,
                             noise_std=t.noise_std)
    learner = InnerSGD(**config.learner.to_dict())
    return Experiment(learner=learner, splits={"train": train, "test": train})

"""Prototypical networks on the 4-block CNN, full Omniglot, the Vinyals protocol (Snell et al.)."""

from __future__ import annotations

from metalearn.experiment import ConfigDict, Experiment
from metalearn.experiments import _omniglot
from metalearn.learners.protonet import ProtoNet
from metalearn.runs import Run


def get_config() -> ConfigDict:
    """Snell et al. 2017's Omniglot recipe: 60-way 1-shot training episodes with 5 queries per
    class, one episode per step, Adam 1e-3 halved every 2000 episodes, a 64-channel CNN; tested
    20-way 1-shot (and 20-way 5-shot, 5-way 1- and 5-shot) on the 423 Vinyals test characters
    with their rotations. No image augmentation: the rotations are the paper's only one."""
    c = _omniglot.base_omniglot_config(report_settings="20x5x5,5x1x15,5x5x15", steps=10000,
                                       eval_every=1000, eval_episodes=200, checkpoint_every=1000)
    c.task.ways, c.task.eval_ways = 60, 20
    c.learner = ConfigDict({"channels": 64, "num_blocks": 4, "refine_steps": 1,
                            "block_order": "conv-bn-relu-pool"})
    c.outer.batch_size = 1
    g = c.outer.gradient
    g.learning_rate, g.schedule, g.decay_every, g.decay_rate = 1e-3, "step", 2000, 0.5
    return c


# `--quick`: a 16-channel CNN on 20-way episodes (a 64-channel CNN on 60 ways is slow to even
# compile and run)
QUICK = {"learner.channels": 16, "task.ways": 20}

DOCS = {**_omniglot.DOCS,
        "learner.channels": "channels of every conv block of the CNN",
        "learner.num_blocks": "conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool)",
        "learner.block_order": "a conv block's order: conv-bn-relu-pool (ours) or "
                               "conv-relu-pool-bn (the official HyperTransformer's)",
        "learner.refine_steps": "soft k-means refinements of the prototypes with unlabeled "
                                "images (0: none)"}


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """ProtoNet learner; the protocol's train, validation and test samplers."""
    learner = ProtoNet(**config.learner.to_dict())
    return Experiment(learner=learner, splits=_omniglot.samplers(config, run),
                      report=_omniglot.report,
                      report_plan=_omniglot.report_plan)

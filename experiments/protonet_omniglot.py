"""Prototypical networks on the 4-block CNN, minimal Omniglot, held-out alphabets."""

from __future__ import annotations

from metalearn.experiment import ConfigDict, Experiment
from metalearn.experiments import _omniglot
from metalearn.learners.protonet import ProtoNet
from metalearn.runs import Run


def get_config() -> ConfigDict:
    """20-way 1-shot, rotations as classes, augmented images, 64-channel CNN, Adam 1e-3."""
    c = _omniglot.base_omniglot_config(report_settings="20x5x5,5x1x15,20x1x5+5,20x1x5@group")
    c.learner = ConfigDict({"channels": 64, "num_blocks": 4, "refine_steps": 1})
    # Koch et al.'s affine distortions per training image: at the default budget (64 channels,
    # 2000 x 2 episodes) 79.98 +- 0.34% at 20-way 1-shot against 79.09 +- 0.35% without, and
    # 68.77 +- 0.47% against 67.65 +- 0.53% within an alphabet (README). Episodes within one
    # alphabet in training did not help (76.39% / 65.95% without augmentation), so they stay off.
    c.task.augment = "image"
    return c


DOCS = {**_omniglot.DOCS,
        "learner.channels": "channels of every conv block of the CNN",
        "learner.num_blocks": "conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool)",
        "learner.refine_steps": "soft k-means refinements of the prototypes with unlabeled "
                                "images (0: none)"}


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """ProtoNet learner; train sampler with rotations, validation/test without."""
    learner = ProtoNet(**config.learner.to_dict())
    return Experiment(learner=learner, splits=_omniglot.samplers(config, run),
                      report=_omniglot.report)

"""Multi-state Hebbian genome (BLUR) on synthetic 2-D tasks, unseen families vs SGD and Adam.

The genome is meta-trained on some task families and tested on unseen ones against the same
network trained by SGD and by Adam."""

from __future__ import annotations

from metalearn.experiment import ConfigDict, Experiment, base_config
from metalearn.experiments import _hebbian
from metalearn.runs import Run
from metalearn.tasks.functions2d import FAMILY_DOCS, Functions2D


def get_config() -> ConfigDict:
    """2-20-2 network, k = 2, T = 5 full-batch Hebbian steps on 64 support points; Adam 3e-3
    (gradient clipped) or CMA-ES (outer.kind=evolution) on the genome's 20 numbers."""
    c = base_config(steps=2000, eval_every=500, eval_episodes=500, test_episodes=1000,
                    checkpoint_every=500, log_every=5, eval_batch_size=250)
    c.task = ConfigDict({
        "train_families": "xor,or,circle,moons,random_linear,square",
        "validation_families": "",
        "test_families": "and,qand,nxor,nand,random_xor,stripe",
        "num_support": 64, "num_queries": 64, "label_noise": 0.0})
    c.learner = _hebbian.learner_config()
    _hebbian.report_config(c)
    c.outer = _hebbian.hebbian_outer(batch_size=16, steps_per_call=50)
    return c


QUICK = _hebbian.QUICK

DOCS = {**_hebbian.DOCS,
        "task.train_families": "families of the meta-training tasks, comma-separated; one of "
                               + ", ".join(FAMILY_DOCS),
        "task.validation_families": "families of the periodic evaluations (empty: the test "
                                    "families)",
        "task.test_families": "unseen families of the test and the report",
        "task.num_support": "labelled points the network is trained on per task",
        "task.num_queries": "points it is scored on",
        "task.label_noise": "probability that a label is flipped"}


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """Samplers over the train / validation / test families; the Hebbian learner."""
    t = config.task
    splits = {}
    for split in ("train", "validation", "test"):
        fams = t.get(f"{split}_families", "")
        if fams:
            splits[split] = Functions2D(families=fams, num_support=t.num_support,
                                        num_queries=t.num_queries, label_noise=t.label_noise)
    return Experiment(learner=_hebbian.build_learner(config, ways=2), splits=splits,
                      report=_hebbian.report, report_plan=_hebbian.report_plan,
                      baselines=_hebbian.baselines)

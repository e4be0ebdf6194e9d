"""Learned optimizers (MLPLOpt, AdafacLOpt) training an MLP from scratch on Omniglot tasks.

The Hebbian genome's inner problem (`hebbian_omniglot`'s network: 784-100-N, tanh hidden units,
linear outputs, T full-batch steps on the support's squared error to the target codes) on the
full Omniglot's Vinyals split: meta-trained on the training characters, tested on unseen
alphabets against SGD and Adam with their rates tuned on training tasks, and against any runs
named in `report_runs` (e.g. `hebbian_omniglot --set data.protocol=vinyals`), at T, 4T and
`report_horizon` x T inner steps, and on a second dataset with `report_dataset` (e.g.
sklearn:digits). `metalearn evaluate RUN --dataset PATH` scores it, and tuned SGD and Adam beside
it, on another image dataset.

`learner.kind=maml` or `metasgd` trains the head-to-head's learned-initialisation entry on the
same tasks and network instead: MAML's meta-learned initial weights then T SGD steps at
`learner.inner_lr`, or Meta-SGD's initial weights and per-weight rates (`MAMLNetwork`)."""

from __future__ import annotations

from metalearn.experiment import ConfigDict, Experiment, base_config
from metalearn.experiments import _hebbian, _omniglot, hebbian_omniglot
from metalearn.learners.lopt import AdafacLOpt, MLPLOpt
from metalearn.learners.maml import MAMLNetwork
from metalearn.runs import Run

KINDS = {"mlp": MLPLOpt, "adafac": AdafacLOpt}
MAML_KINDS = {"maml": "fixed", "metasgd": "per_param"}  # kind -> MAMLNetwork.lr_mode


def get_config() -> ConfigDict:
    """5-way tasks of 10 labelled and 10 query images, the 784-100-5 network, T = 10 steps of
    the small factored optimizer from normalised-gradient descent; Adam 1e-3 (clipped) on 8
    tasks a step, or (outer.kind=evolution) CMA-ES at population 32 on the error at T."""
    base = _omniglot.base_omniglot_config()
    c = base_config(steps=1000, eval_every=250, eval_episodes=200, test_episodes=1000,
                    checkpoint_every=250, log_every=5, eval_batch_size=100)
    c.data = base.data
    c.task = hebbian_omniglot.get_config().task  # the genome's tasks, for a like comparison
    c.learner = ConfigDict({"kind": "adafac", "hidden": "100", "inner_steps": 10,
                            "inner_batch_size": 0, "replicas": 1, "hidden_activation": "tanh",
                            "output_activation": "identity", "init_scale": 1.0,
                            "target_low": -1.0, "meta_loss": "cross_entropy",
                            "hidden_size": 0, "hidden_layers": 2, "step_mult": 0.003,
                            "exp_mult": 0.1, "start": "sgd", "max_offset": 0,
                            "loss_cap": 10.0, "inner_lr": 0.1, "score_steps": ""})
    _hebbian.report_config(c)
    c.report_horizon = 10
    c.outer = _hebbian.hebbian_outer(batch_size=8, steps_per_call=25)
    c.outer.gradient.learning_rate = 1e-3
    # evolution needs no gradient, so it scores what the report measures: the error at T
    c.outer.evolution.fitness = "error"
    return c


# `--quick`: a 20-unit hidden layer, 2 tasks a step and a report up to 4T besides the cheap tuning
QUICK = {**_hebbian.QUICK, "learner.hidden": "20", "outer.batch_size": 2, "report_horizon": 4}

DOCS = {**{k: v for k, v in _omniglot.DOCS.items()
           if k.startswith(("data.", "task.")) and k != "task.unlabeled"},
        "task.unlabeled": "unlabeled images per class (unused by this learner)",
        **{k: v for k, v in _hebbian.DOCS.items()
           if not k.startswith("learner.") or k.removeprefix("learner.") in (
               "hidden", "inner_steps", "inner_batch_size", "replicas", "hidden_activation",
               "output_activation", "init_scale", "target_low", "meta_loss", "score_steps")},
        "learner.inner_steps": "learned-optimizer steps per episode (T, the meta-training "
                               "unroll)",
        "learner.kind": "adafac (small factored, 134 meta-parameters at hidden_size 4), mlp "
                        "(Metz et al.'s MLPLOpt, 1,762 at 32), maml (learned initial weights, "
                        "then SGD at inner_lr) or metasgd (learned weights and per-weight rates)",
        "learner.inner_lr": "maml: the SGD rate; metasgd: where its rates start (default: "
                            "SGD's tuned rate on this network); unused by the optimizers",
        "learner.hidden_size": "units per hidden layer of the optimizer's MLP (0: the kind's: "
                               "32 mlp, 4 adafac)",
        "learner.hidden_layers": "hidden layers of the optimizer's MLP",
        "learner.step_mult": "c2 in p <- p - d exp(a c1) c2 (learned_optimization: 0.001)",
        "learner.exp_mult": "c1 (learned_optimization: 0.001)",
        "learner.start": "sgd (the MLP starts as normalised-gradient descent), adam (as "
                         "normalised m / sqrt(v), adafac only) or random",
        "learner.max_offset": "each task's step counter starts in [0, max_offset) (0: at 0)",
        "learner.loss_cap": "meta-loss of a diverged (NaN/inf) inner run; its gradient is 0",
        }


def build_learner(config: ConfigDict, ways: int):
    """The learned optimizer (or MAML / Meta-SGD) of `config.learner` for `ways` classes."""
    cfg = _hebbian.network_fields(config.learner.to_dict())
    kind = cfg.pop("kind")
    if kind not in KINDS and kind not in MAML_KINDS:
        raise ValueError(f"learner.kind={kind!r}: use adafac, mlp, maml or metasgd")
    inner_lr = cfg.pop("inner_lr")
    if kind in MAML_KINDS:
        net = {f: cfg[f] for f in (*_hebbian.NETWORK_FIELDS, "score_steps") if f != "ways"}
        return MAMLNetwork(ways=ways, inner_lr=inner_lr, lr_mode=MAML_KINDS[kind], **net)
    if not cfg["hidden_size"]:
        cfg.pop("hidden_size")
    return KINDS[kind](ways=ways, **cfg)


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """The protocol's Omniglot split; a learned optimizer training an MLP on flattened images."""
    return Experiment(learner=build_learner(config, config.task.ways),
                      splits=_omniglot.samplers(config, run), report=_hebbian.report,
                      report_plan=_hebbian.report_plan,
                      baselines=_hebbian.baselines)

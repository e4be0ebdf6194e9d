"""HyperTransformer (all layers or logits only, supervised or semi-supervised), full Omniglot."""

from __future__ import annotations

from metalearn.experiment import ConfigDict, Experiment
from metalearn.experiments import _omniglot
from metalearn.learners.hypertransformer import HyperTransformer
from metalearn.runs import Run


def get_config() -> ConfigDict:
    """`protonet_omniglot`'s data, split and report; an 8-channel CNN, every layer generated.

    The paper's Omniglot generator: 3 transformer layers, 2 heads, width fraction 1, label and
    placeholder embeddings of 32, shared image features of 32 and per-layer activation
    features of 8 channels. It trained with plain SGD for 4 M single-episode steps; on a CPU
    budget Adam 1e-3 on 2 episodes per step (as ProtoNet here) is used instead."""
    c = _omniglot.base_omniglot_config()
    c.learner = ConfigDict({"channels": 8, "num_blocks": 4, "trained_blocks": 0,
                            "learned_base": False, "embed_dim": 32,
                            "shared_features": 32, "local_features": 8, "num_layers": 3,
                            "heads": 2, "width_fraction": 1.0, "sequential": True,
                            "batch_norm": "support", "block_order": "conv-bn-relu-pool"})
    return c


# `--quick`: two generated blocks, one transformer layer each (compiling dominates a short run)
QUICK = {"learner.num_layers": 1, "learner.num_blocks": 2}

DOCS = {**_omniglot.DOCS,
        "learner.channels": "channels of every conv block of the generated CNN",
        "learner.num_blocks": "conv blocks (3x3 conv, batch norm, ReLU, 2x2 max-pool)",
        "learner.trained_blocks": "first k conv blocks learned, not generated (num_blocks: "
                                  "generate the logits layer only)",
        "learner.learned_base": "add each generated conv kernel to a learned one (the official "
                                "code's --add_trainable_weights)",
        "learner.embed_dim": "d: size of the label and weight-placeholder embeddings",
        "learner.shared_features": "channels of the shared image feature extractor (0: none)",
        "learner.local_features": "channels of each layer's activation feature extractor",
        "learner.num_layers": "transformer layers per generated CNN layer",
        "learner.heads": "attention heads",
        "learner.width_fraction": "query/key, value and feed-forward sizes / token width (nu)",
        "learner.batch_norm": "queries normalised with the support's batch-norm statistics "
                              "(support) or with their own batch's, as the official code "
                              "(batch: transductive)",
        "learner.block_order": "a conv block's order: conv-bn-relu-pool (ours) or "
                               "conv-relu-pool-bn (the official HyperTransformer's)",
        "learner.sequential": "when conv layers are generated, run a batch's query CNNs one "
                              "episode after another (faster on CPU; false on accelerators); "
                              "same numbers"}


def build(config: ConfigDict, run: Run | None = None) -> Experiment:
    """A HyperTransformer generating a `task.ways`-way CNN; the Omniglot samplers."""
    learner = HyperTransformer(ways=config.task.ways, **config.learner.to_dict())
    return Experiment(learner=learner, splits=_omniglot.samplers(config, run),
                      report=_omniglot.report,
                      report_plan=_omniglot.report_plan)

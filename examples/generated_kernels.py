"""How task-specific are a trained HyperTransformer's generated conv kernels?

    python examples/generated_kernels.py RUN_DIR [--reference 200]

For a run of `ht_omniglot` (or `cht_omniglot`), on episodes of its test split:

1. the spread of each generated conv layer across episodes: the root-mean-square deviation of
   the kernels from their mean over `--reference` episodes, relative to the kernels' own
   root-mean-square (0: the same kernel whatever the support set);
2. (HyperTransformer) test accuracy with every episode's generated conv kernels against the
   same model with those kernels replaced by their mean over the `--reference` episodes, the
   logits layer still generated from the support through that CNN, paired over the test
   episodes `metalearn train` reported (`test_episodes` of them, from the test seed). A
   difference of 0 means the conv layers act as one learned CNN and only the logits layer
   adapts to the task.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from metalearn.core import InnerLearner, MetaParams, Support
from metalearn.evaluation import format_value, paired_difference, summarize
from metalearn.learners.continual import ContinualHyperTransformer
from metalearn.learners.hypertransformer import HyperTransformer
from metalearn.reload import LoadedRun, load_run
from metalearn.training import evaluate_split


@dataclasses.dataclass(frozen=True)
class MeanKernels(InnerLearner):
    """A trained HyperTransformer whose conv layers use fixed raw slices (meta["slices"])."""

    ht: HyperTransformer

    def adapt(self, meta: MetaParams, support: Support, key: jax.Array) -> dict:
        """The HyperTransformer's adaptation with the conv slices given, the head generated."""
        return self.ht.adapt_with_slices(meta["ht"], support, meta["slices"])

    def predict(self, meta: MetaParams, state: dict, query_x: jax.Array) -> jax.Array:
        """Logits of the CNN built in `adapt`."""
        return self.ht.predict(meta["ht"], state, query_x)


def conv_kernels(learner: HyperTransformer, meta: MetaParams, episodes) -> list[np.ndarray]:
    """Each generated conv layer's kernels over a batch of episodes: [E, (tasks,) 3, 3, Cin, C]."""
    support = episodes.support()
    if isinstance(learner, ContinualHyperTransformer):
        per_task = jax.vmap(lambda s: learner.generated(meta, s))(support)
        return [np.stack([np.asarray(t["blocks"][i]["w"]) for t in per_task], axis=1)
                for i in range(learner.trained_blocks, learner.num_blocks)]
    params = jax.vmap(lambda s: learner.generated(meta, s))(support)
    return [np.asarray(b["w"]) for b in params["blocks"][learner.trained_blocks:]]


def spread(kernels: np.ndarray) -> dict[str, float]:
    """RMS of the kernels and RMS deviation from their mean over episodes (and tasks); a
    learned base (`learned_base`) is the same in every episode, so it moves only the RMS."""
    flat = kernels.reshape(-1, *kernels.shape[-4:])
    rms = float(np.sqrt(np.mean(flat ** 2)))
    dev = float(np.sqrt(np.mean((flat - flat.mean(axis=0)) ** 2)))
    return {"rms": rms, "spread": dev, "relative": dev / rms}


def mean_kernel_ablation(run: LoadedRun, key: jax.Array, reference: int = 200
                         ) -> dict[str, dict]:
    """Test accuracy of the run with its generated kernels and with their mean over
    `reference` episodes, and the paired difference (mean minus generated), on the test
    episodes `metalearn train` reported."""
    learner, meta = run.learner, run.meta
    ref = run.splits["test"].sample_batch(key, reference).support()
    slices = jax.vmap(lambda s: learner.conv_slices(meta, s))(ref)
    fixed = {"ht": meta, "slices": [s.mean(axis=0) for s in slices]}
    own = evaluate_split(run.config, run, meta, per_episode=True)
    mean = evaluate_split(run.config, run, fixed, learner=MeanKernels(learner), per_episode=True)
    return {"generated": summarize(own), "mean kernels": summarize(mean),
            "difference": paired_difference(mean, own)}


def main(argv: list[str] | None = None) -> None:
    """Print the spread of the generated kernels and the mean-kernel ablation of a run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--reference", type=int, default=200,
                    help="episodes the mean kernels and the spread are taken over")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run = load_run(args.run_dir)
    learner, meta = run.learner, run.meta
    if not isinstance(learner, HyperTransformer):
        raise SystemExit(f"{args.run_dir} trained a {type(learner).__name__}; this study needs a "
                         "HyperTransformer or ContinualHyperTransformer run")
    if learner.trained_blocks >= learner.num_blocks:
        raise SystemExit(f"{args.run_dir} generates the logits layer only: no conv kernels")
    key = jax.random.PRNGKey(args.seed)
    episodes = run.splits["test"].sample_batch(jax.random.fold_in(key, 1), args.reference)
    print(f"{args.run_dir} (step {run.step}), {args.reference} test episodes:")
    for i, k in enumerate(conv_kernels(learner, meta, episodes)):
        layer = learner.trained_blocks + i
        s = spread(k)
        print(f"  conv {layer}: kernel rms {s['rms']:.4f}, spread across episodes "
              f"{s['spread']:.4f} ({100 * s['relative']:.2f} % of the rms)")
    if isinstance(learner, ContinualHyperTransformer):
        return
    res = mean_kernel_ablation(run, jax.random.fold_in(key, 2), args.reference)
    for name, r in res.items():
        print(f"  {name}: accuracy {format_value(100 * r['accuracy'], 100 * r['accuracy_ci95'], 2)}"
              f" % ({r['episodes']} episodes)")


if __name__ == "__main__":
    main()

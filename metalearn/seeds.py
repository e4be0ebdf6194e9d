"""Every fixed PRNG seed of the framework, one per purpose, so that no two purposes share
episodes and every figure in a run directory can be reproduced from its config."""

EVAL_SEED = 1_000_003  # periodic evaluations during training (the validation split)
TEST_SEED = 2_000_003  # the final test figures of `metalearn train`, repeated by `evaluate`
MANIFEST_SEED = 4_000_037  # the learner's keys on a manifest's fixed episodes
REPORT_SEED = 5_000_011  # an experiment's report (seed + i for its i-th extra setting)
# Offsets from the run's seed for work done once per run besides meta-training:
GD_SEARCH_OFFSET = 7  # tasks the GD / GD++ step sizes are line-searched on (icl_gd)
BASELINE_OFFSET = 11  # meta-training of a learned baseline (icl_gd_nonlinear's MLP + GD)

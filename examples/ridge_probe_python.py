"""The ridge-probe study from Python: both outer loops built from your own optax and evosax
objects, runs that reload and evaluate like `metalearn train` runs.

    python examples/ridge_probe_python.py [RUNS_FOLDER] [STEPS]
"""

import sys

import jax
import optax
from evosax.algorithms import CMA_ES
from ridge_probe import Blobs, RidgeProbe  # the experiment file next to this one

import metalearn as ml

runs = sys.argv[1] if len(sys.argv) > 1 else "runs"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
learner, task = RidgeProbe(ways=3), Blobs(ways=3)
key = jax.random.PRNGKey(0)
quiet = ml.RunOptions(progress=False)

# Gradient meta-training with an optax optimizer of your own (schedule included).
adam = optax.adam(optax.cosine_decay_schedule(0.01, decay_steps=steps))
gd = ml.GradientOuterLoop(optimizer=adam, batch_size=16)
gd.run(learner, task, key, steps=steps, eval_sampler=task, run_dir=f"{runs}/py-gd", options=quiet)

# CMA-ES with an evosax strategy of your own, built for the learner's meta-parameters.
cma = CMA_ES(population_size=16, solution=learner.init(key, task.example()))
es = ml.EvolutionOuterLoop(strategy=cma, batch_size=16)
es.run(learner, task, key, steps=steps, eval_sampler=task, run_dir=f"{runs}/py-es", options=quiet)

# Reload: the learner and the sampler are rebuilt from config.json (their classes live in an
# importable module); objects config.json cannot hold, like these optimizers, are passed in.
for name, outer in (("py-gd", gd), ("py-es", es)):
    run = ml.load_run(f"{runs}/{name}", outer=outer)
    print(f"{name}: step {run.step}, {ml.format_metrics(run.evaluate())}")

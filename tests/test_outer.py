"""Gradient and evolution outer loops: learning, equivalences, resume, sharding, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import batch_loss
from metalearn.evaluation import evaluate
from metalearn.learners.maml import MAML
from metalearn.nn import Linear
from metalearn.outer.driver import NonFiniteLossError, RunOptions
from metalearn.outer.evolution import EvolutionOuterLoop
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.regression import LinearRegression
from tests.helpers import ConstantSampler, QuadraticLearner, tensorboard_scalars

QUIET = RunOptions(progress=False)


def inner_sgd(steps: int = 3, lr: float = 0.1) -> MAML:
    """MAML on a zero-initialised linear model with a learned scalar step size."""
    return MAML(Linear(), inner_steps=steps, inner_lr=lr, lr_mode="scalar")
TASKS = LinearRegression(dim=4, num_context=8, num_queries=8, input_range=1.0,
                         weight_mean=1.0, weight_scale=0.3)


def test_gradient_loop_lowers_held_out_loss():
    learner = inner_sgd(2, 0.05)
    outer = GradientOuterLoop(learning_rate=1e-2, batch_size=16, steps_per_call=50)
    key = jax.random.PRNGKey(0)
    meta0 = learner.init(key, TASKS.example())
    before = evaluate(learner, meta0, TASKS, jax.random.PRNGKey(9), 400)["loss"]
    res = outer.run(learner, TASKS, key, steps=150, options=QUIET)
    after = evaluate(learner, res.meta, TASKS, jax.random.PRNGKey(9), 400)["loss"]
    assert after < 0.5 * before, (before, after)
    # the learned initialisation moves towards the tasks' mean weight (1.0)
    assert float(jnp.mean(res.meta["params"]["head"]["w"])) > 0.3


@pytest.mark.parametrize("strategy", ["CMA_ES", "Open_ES", "Sep_CMA_ES"])
def test_evolution_solves_quadratic(strategy):
    learner = QuadraticLearner(dim=8)
    kw = {"std_init": 0.5}
    if strategy == "Open_ES":
        kw = {"std_init": 0.03, "learning_rate": 0.03}  # loss < 0.006 on seeds 0-4
    outer = EvolutionOuterLoop(strategy=strategy, population_size=16, batch_size=1,
                               steps_per_call=100, **kw)
    steps = 400 if strategy == "Open_ES" else 200
    res = outer.run(learner, ConstantSampler(), jax.random.PRNGKey(1), steps=steps,
                    options=QUIET)
    final = float(learner.loss(res.meta, None, None)[0])
    assert final < 1e-2, (strategy, final)
    np.testing.assert_allclose(res.meta["theta"], learner.target(), atol=0.1)


def test_vmapped_population_equals_python_loop():
    learner = inner_sgd(2)
    outer = EvolutionOuterLoop(strategy="Sep_CMA_ES", population_size=6, batch_size=4)
    key = jax.random.PRNGKey(3)
    meta = learner.init(key, TASKS.example())
    pop = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(key, (6, *a.shape)), meta)
    episodes = TASKS.sample_batch(jax.random.PRNGKey(4), 4)
    k = jax.random.PRNGKey(5)
    vm = outer.population_fitness(learner, pop, episodes, k)
    loop = [float(batch_loss(learner, jax.tree.map(lambda a, i=i: a[i], pop), episodes, k)[0])
            for i in range(6)]
    np.testing.assert_allclose(np.asarray(vm), loop, rtol=1e-5)


def test_steps_per_call_does_not_change_numbers():
    learner = inner_sgd(2)
    key = jax.random.PRNGKey(0)
    a = GradientOuterLoop(batch_size=8, steps_per_call=1).run(
        learner, TASKS, key, steps=6, options=QUIET)
    b = GradientOuterLoop(batch_size=8, steps_per_call=4).run(
        learner, TASKS, key, steps=6, options=QUIET)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
                 a.meta, b.meta)


# the evolution case compiles 3 runs (15 s): with `pytest -m slow`, beside the two-process
# resume of both loops (test_distributed.py)
@pytest.mark.parametrize("kind", ["gradient", pytest.param("evolution", marks=pytest.mark.slow)])
def test_resume_continues_exactly(tmp_path, kind):
    learner = inner_sgd(2)
    if kind == "gradient":
        make = lambda: GradientOuterLoop(batch_size=8, steps_per_call=5)
    else:  # 5 steps per call: one compiled chunk size serves both runs (compiling dominates)
        make = lambda: EvolutionOuterLoop(strategy="Sep_CMA_ES", population_size=8,
                                          batch_size=4, steps_per_call=5)
    key = jax.random.PRNGKey(7)
    full = make().run(learner, TASKS, key, steps=10, options=QUIET)
    make().run(learner, TASKS, key, steps=5, run_dir=tmp_path / "r", options=QUIET)
    resumed = make().run(learner, TASKS, key, steps=10, run_dir=tmp_path / "r", resume=True,
                         options=QUIET)
    assert int(resumed.state.step) == 10
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 full.state, resumed.state)
    steps = [r["step"] for r in resumed.history if r["split"] == "train"]
    assert steps == list(range(1, 11))  # metrics log continues without gaps or repeats


def test_metric_writers_agree_after_a_resume_from_an_earlier_step(tmp_path):
    """metrics.jsonl, the TensorBoard events and a user callback see the same records; a
    resume from an earlier checkpoint drops the later ones from all the files."""
    from metalearn.outer.driver import TENSORBOARD_DIR

    class Recorder:
        def __init__(self):
            self.records, self.closed = [], False

        def on_records(self, records):
            self.records.extend(records)

        def close(self):
            self.closed = True

    learner, key = inner_sgd(1), jax.random.PRNGKey(3)
    outer = GradientOuterLoop(batch_size=4, steps_per_call=5)
    opts = RunOptions(progress=False, checkpoint_every=5, eval_every=5, eval_episodes=8,
                      eval_batch_size=8)
    first = Recorder()
    outer.run(learner, TASKS, key, steps=10, run_dir=tmp_path, options=opts,
              eval_sampler=TASKS, callbacks=[first])
    assert first.closed and [r["step"] for r in first.records if r["split"] == "train"] == \
        list(range(1, 11))
    later = Recorder()  # a resume to fewer steps, at another rate: steps 9-10 must go
    res = dataclasses.replace(outer, learning_rate=0.1).run(
        learner, TASKS, key, steps=8, run_dir=tmp_path, resume=True, from_step=5,
        options=opts, eval_sampler=TASKS, callbacks=[later])
    assert [r["step"] for r in later.records if r["split"] == "train"] == [6, 7, 8]
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert jsonl == res.history
    tb = tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    assert max(r["step"] for r in jsonl) == 8
    for split in ("train", "eval"):
        want = {r["step"]: r["loss"] for r in jsonl if r["split"] == split}
        assert tb[f"{split}/loss"] == pytest.approx(want, rel=1e-6)
    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.*"))) == 2


def test_existing_run_is_not_overwritten(tmp_path):
    learner = inner_sgd(1)
    outer = GradientOuterLoop(batch_size=4)
    outer.run(learner, TASKS, jax.random.PRNGKey(0), steps=3, run_dir=tmp_path, options=QUIET)
    with pytest.raises(FileExistsError, match=r"continue it with resume=True"):
        outer.run(learner, TASKS, jax.random.PRNGKey(0), steps=3, run_dir=tmp_path,
                  options=QUIET)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    learner = inner_sgd(3, 0.05)
    outer = GradientOuterLoop(optimizer="sgd", learning_rate=1e4, batch_size=4,
                              steps_per_call=2)
    opts = RunOptions(progress=False, checkpoint_every=2)
    bad = LinearRegression(dim=4, num_context=8, num_queries=8, input_range=30.0)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+") as e:
        outer.run(learner, bad, jax.random.PRNGKey(0), steps=200, run_dir=tmp_path,
                  options=opts)
    err = e.value
    assert err.last_checkpoint is None or err.last_checkpoint < err.step
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert all(s < err.step for s in saved)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        GradientOuterLoop(optimizer="adamx")
    with pytest.raises(ValueError, match="unknown evosax strategy 'CMAES'.*Sep_CMA_ES"):
        EvolutionOuterLoop(strategy="CMAES")
    with pytest.raises(ValueError, match="population_size must be even"):
        EvolutionOuterLoop(strategy="Open_ES", population_size=7)
    big = QuadraticLearner(dim=6000)
    with pytest.raises(ValueError, match="Sep_CMA_ES.*Open_ES"):
        EvolutionOuterLoop(strategy="CMA_ES").init(big, ConstantSampler(), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        GradientOuterLoop().run(inner_sgd(), TASKS, jax.random.PRNGKey(0), steps=0, options=QUIET)


SHARD_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {root!r})
    import jax, numpy as np
    from metalearn.learners.maml import MAML
    from metalearn.nn import Linear
    from metalearn.outer.base import device_mesh
    from metalearn.outer.driver import RunOptions
    from metalearn.outer.evolution import EvolutionOuterLoop
    from metalearn.outer.gradient import GradientOuterLoop
    from metalearn.tasks.regression import LinearRegression
    assert jax.device_count() == 4, jax.devices()
    tasks = LinearRegression(dim=4, num_context=8, num_queries=8, weight_mean=1.0)
    learner = MAML(Linear(), inner_steps=2, lr_mode="scalar")
    mesh = device_mesh()
    assert mesh is not None and mesh.size == 4
    for outer in (GradientOuterLoop(batch_size=8), EvolutionOuterLoop(population_size=8,
                                                                      batch_size=4)):
        s0 = outer.init(learner, tasks, jax.random.PRNGKey(0))
        a, ma = outer.compiled_steps(learner, tasks, None)(s0, 3)
        s0 = outer.init(learner, tasks, jax.random.PRNGKey(0))
        b, mb = outer.compiled_steps(learner, tasks, mesh)(s0, 3)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-5)
        res = outer.run(learner, tasks, jax.random.PRNGKey(0), steps=3,
                        options=RunOptions(progress=False))
        for x, y in zip(jax.tree.leaves(res.state), jax.tree.leaves(a)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-5)
    print("SHARDED_OK")
""")


@pytest.mark.slow  # a fresh process with 4 simulated devices compiles both loops twice: 22 s
def test_sharded_and_unsharded_steps_agree():
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", SHARD_SCRIPT.format(root=root)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert "SHARDED_OK" in out.stdout, out.stdout + out.stderr


def test_full_covariance_refusal_names_settings_that_exist(tmp_path, capsys):
    """CMA-ES over too many meta-parameters: the fix names the key `--set` accepts (and the
    constructor argument in Python)."""
    from metalearn.cli import main

    loop = EvolutionOuterLoop(strategy="CMA_ES", max_full_covariance_dim=4)
    with pytest.raises(ValueError, match="raise max_full_covariance_dim=... if you have"):
        loop.init(QuadraticLearner(dim=8), ConstantSampler(), jax.random.PRNGKey(0))
    assert main(["train", "linreg_sgd", "--no-progress", "--run-dir", str(tmp_path / "r"),
                 "--set", "outer.kind=evolution",
                 "--set", "outer.evolution.strategy=CMA_ES",
                 "--set", "outer.evolution.max_full_covariance_dim=2"]) == 2
    err = capsys.readouterr().err
    assert "raise --set outer.evolution.max_full_covariance_dim=..." in err, err
    assert "--set outer.evolution.strategy=Sep_CMA_ES" in err

"""Core types, losses, checkpoints and config overrides."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.checkpoint import Checkpointer, CheckpointError
from metalearn.config import apply_overrides
from metalearn.core import Episode, check_episode, query_loss
from metalearn.evaluation import summarize
from metalearn.experiment import base_config
from metalearn.tasks.regression import LinearRegression


def _ep(**kw):
    base = dict(support_x=jnp.zeros((5, 3)), support_y=jnp.zeros((5,), jnp.int32),
                query_x=jnp.zeros((4, 3)), query_y=jnp.zeros((4,), jnp.int32))
    base.update(kw)
    return Episode(**base)


def test_check_episode_accepts_good_and_batched():
    check_episode(_ep())
    check_episode(jax.tree.map(lambda a: jnp.stack([a, a]), _ep()), batched=True)


@pytest.mark.parametrize("kw,match", [
    ({"support_y": jnp.zeros((6,), jnp.int32)}, "support_x has 5 examples but support_y has 6"),
    ({"query_x": jnp.zeros((4, 2))}, r"support_x examples have shape \(3,\) but query_x"),
    ({"query_y": jnp.zeros((4,))}, "support_y is int32 but query_y is float32"),
    ({"query_y": jnp.zeros((3,), jnp.int32)}, "query_x has 4 examples but query_y has 3"),
    ({"unlabeled_x": jnp.zeros((2, 7))}, "unlabeled_x examples have shape"),
])
def test_check_episode_errors_name_the_problem(kw, match):
    with pytest.raises(ValueError, match=match):
        check_episode(_ep(**kw))


def test_query_loss_matches_numpy():
    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
    y = jnp.array([0, 1, 2, 3, 0, 1])
    loss, m = query_loss(logits, y)
    lg = np.asarray(logits, np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(loss), -logp[np.arange(6), np.asarray(y)].mean(), rtol=1e-5)
    assert float(m["accuracy"]) == pytest.approx(np.mean(lg.argmax(-1) == np.asarray(y)))
    pred, tgt = jnp.ones((3, 2)), jnp.zeros((3, 2))
    assert float(query_loss(pred, tgt)[0]) == pytest.approx(1.0)  # 1/2 * sum over dy of 1
    with pytest.raises(ValueError, match="regression predictions have shape"):
        query_loss(jnp.ones((3, 1)), jnp.zeros((3, 2)))


def test_summarize_ci():
    v = np.array([0.0, 1.0] * 50)
    s = summarize({"accuracy": v})
    assert s["accuracy"] == 0.5 and s["episodes"] == 100
    assert s["accuracy_ci95"] == pytest.approx(1.96 * v.std(ddof=1) / 10)


def test_episode_values_are_what_evaluate_summarises_and_pair_by_episode():
    """`episode_values` gives one value per episode (a ragged last chunk cut), `evaluate` its
    summary; `paired_difference` is the summary of the differences, narrower than either
    interval when the episodes' difficulty is shared."""
    from metalearn.evaluation import episode_values, evaluate, paired_difference
    from metalearn.learners.network import GradientBaseline
    from metalearn.tasks.functions2d import Functions2D

    tasks = Functions2D(families=("moons",), num_support=16, num_queries=16)
    net = GradientBaseline(ways=2, hidden=(4,), inner_steps=3, optimizer="sgd")
    key = jax.random.PRNGKey(3)
    args = (tasks, key, 5, 2)
    slow, fast = ({"learning_rate": jnp.float32(lr)} for lr in (0.01, 1.0))
    v_slow = episode_values(net, slow, *args)
    assert v_slow["accuracy"].shape == (5,) and len(set(v_slow["loss"].tolist())) > 1
    assert summarize(v_slow) == evaluate(net, slow, *args)
    v_fast = episode_values(net, fast, *args)
    d = paired_difference(v_fast, v_slow)
    assert d == summarize({k: v_fast[k].astype(np.float64) - v_slow[k] for k in v_fast})

    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0.3, 0.9, 400)
    a, b = difficulty + 0.02, difficulty + rng.normal(0, 0.01, 400)
    paired = paired_difference({"accuracy": a}, {"accuracy": b})
    assert paired["accuracy"] == pytest.approx(0.02, abs=0.002)
    assert paired["accuracy_ci95"] < summarize({"accuracy": a})["accuracy_ci95"] / 10


def test_sampler_is_deterministic_and_vmappable():
    s = LinearRegression(dim=3, num_context=5, num_queries=2)
    a = s.sample_batch(jax.random.PRNGKey(1), 4)
    b = jax.jit(s.sample_batch, static_argnums=1)(jax.random.PRNGKey(1), 4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert a.support_x.shape == (4, 5, 3) and a.query_y.shape == (4, 2, 1)
    one = s.sample(jax.random.split(jax.random.PRNGKey(1), 4)[2])
    np.testing.assert_array_equal(one.support_y, a.support_y[2])


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    c = Checkpointer(tmp_path)
    st = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3), "key": jax.random.PRNGKey(1)}
    c.save(1, st, {"a": 1})
    c.save(2, jax.tree.map(lambda a: a + 1, st), {"a": 1})
    step, got = c.restore(st)
    assert step == 2
    np.testing.assert_array_equal(got["w"], np.arange(6.0).reshape(2, 3) + 1)
    assert c.read_config() == {"a": 1}
    # corrupt the newest checkpoint's data files: a clear error that names the good fallback
    for p in (tmp_path / "2" / "state").rglob("*"):
        if p.is_file():
            p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"could not be read.*steps \[1\]"):
        c.restore(st)
    step, got = c.restore(st, step=1)  # the older checkpoint is untouched
    np.testing.assert_array_equal(got["w"], np.arange(6.0).reshape(2, 3))
    with pytest.raises(CheckpointError, match="shape"):
        c.restore({**st, "w": jnp.zeros((3, 3))}, step=1)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        Checkpointer(tmp_path / "empty").restore(st)


def test_overrides_parse_and_reject():
    c = base_config()
    apply_overrides(c, ["steps=20", "outer.gradient.learning_rate=1e-2",
                        "outer.gradient.clip_norm=1", "outer.kind=evolution", "eval_every=5"])
    assert c.steps == 20 and c.outer.gradient.learning_rate == 0.01
    assert c.outer.kind == "evolution" and c.outer.gradient.clip_norm == 1
    # "none" is the word for a string field and None (no value) for an optional one
    apply_overrides(c, ["outer.kind=none", "outer.gradient.clip_norm=none"])
    assert c.outer.kind == "none" and c.outer.gradient.clip_norm is None
    with pytest.raises(KeyError, match="no field 'stepz'"):
        apply_overrides(c, ["stepz=3"])
    with pytest.raises(KeyError, match="'nope' is not a config section"):
        apply_overrides(c, ["nope.x=3"])
    with pytest.raises(TypeError, match="expected an int"):
        apply_overrides(c, ["steps=abc"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(c, ["steps"])


def test_outer_config_has_one_section_per_loop_kind():
    from metalearn.experiment import outer_config
    from metalearn.outer.evolution import EvolutionOuterLoop
    from metalearn.outer.gradient import GradientOuterLoop
    from metalearn.outer.registry import build_outer, check_outer_sets, used_outer

    c = outer_config("gradient", gradient={"learning_rate": 3e-3},
                     evolution={"population_size": 8}, batch_size=4)
    assert set(c.gradient) >= {"optimizer", "learning_rate", "clip_norm"}
    assert set(c.evolution) >= {"strategy", "population_size", "std_init", "learning_rate"}
    assert not set(c.gradient) & set(c.evolution) - {"learning_rate"}
    g = build_outer(c)
    assert isinstance(g, GradientOuterLoop) and (g.learning_rate, g.batch_size) == (3e-3, 4)
    c.kind = "evolution"
    e = build_outer(c)
    assert isinstance(e, EvolutionOuterLoop) and (e.population_size, e.batch_size) == (8, 4)
    assert set(used_outer(c)) == {"kind", "batch_size", "steps_per_call", "shard", "evolution"}
    # a field of the other loop's section is refused, naming the section that is read
    with pytest.raises(ValueError, match=r"outer.kind=evolution.*reads outer.evolution.\*"):
        check_outer_sets(c, ["outer.gradient.clip_norm=1"])
    check_outer_sets(c, ["outer.evolution.std_init=0.2", "steps=3"])
    with pytest.raises(KeyError, match=r"did you mean outer.gradient.clip_norm\?"):
        apply_overrides(base_config(), ["outer.clip_norm=1"])
    with pytest.raises(KeyError, match="outer.gradient has no field 'strategy'"):
        outer_config("gradient", gradient={"strategy": "CMA_ES"})


def test_evolution_learning_rate_is_refused_where_it_means_nothing():
    from metalearn.outer.evolution import EvolutionOuterLoop

    with pytest.raises(ValueError, match="CMA_ES has no learning rate"):
        EvolutionOuterLoop(strategy="CMA_ES", learning_rate=0.1)
    assert EvolutionOuterLoop(strategy="Open_ES", learning_rate=0.1).learning_rate == 0.1


def test_runs_of_the_flat_outer_config_are_upgraded():
    from metalearn.outer.registry import upgrade_outer

    old = {"kind": "evolution", "optimizer": "adamw", "learning_rate": 0.01, "clip_norm": None,
           "strategy": "Sep_CMA_ES", "population_size": 16, "std_init": 0.05, "batch_size": 8,
           "steps_per_call": 10, "max_full_covariance_dim": 5000, "shard": "auto"}
    new = upgrade_outer(old)
    assert new["kind"] == "evolution" and new["batch_size"] == 8
    assert new["evolution"]["population_size"] == 16
    assert new["evolution"]["learning_rate"] is None  # Sep-CMA-ES never read it
    assert new["gradient"]["optimizer"] == "adamw" and new["gradient"]["learning_rate"] == 0.01
    assert upgrade_outer(new) == new


def test_a_run_made_before_an_experiment_gained_a_field_reads_it_at_its_default():
    """A recorded config lacking fields the experiment has today (top level and in a section)
    gets them at their defaults; what it recorded is kept."""
    from metalearn.experiments import lopt_omniglot
    from metalearn.training import upgrade_config

    recorded = lopt_omniglot.get_config().to_dict()
    recorded.update(experiment="lopt_omniglot", report_runs="runs/a", steps=7)
    del recorded["report_dataset"], recorded["learner"]["loss_cap"]
    recorded["learner"]["step_mult"] = 0.03
    up = upgrade_config(recorded)
    assert up["report_dataset"] == "" and up["learner"]["loss_cap"] == 10.0
    assert (up["report_runs"], up["steps"], up["learner"]["step_mult"]) == ("runs/a", 7, 0.03)


def test_top_level_exports_resolve():
    import metalearn

    for name in metalearn.__all__:
        assert getattr(metalearn, name) is not None, name
    assert metalearn.Episode is Episode and metalearn.GradientOuterLoop.__name__ == \
        "GradientOuterLoop"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        metalearn.Nope  # noqa: B018


def test_compiled_evaluators_are_bounded_and_reused():
    """The cache of compiled evaluation functions keeps the most recent CACHE_SIZE entries:
    many learners do not pile up programs, and a learner evaluated again gives the same
    figures."""
    from metalearn import evaluation
    from tests.helpers import ConstantSampler, QuadraticLearner

    sampler, key = ConstantSampler(), jax.random.PRNGKey(0)
    first = evaluation.evaluate(QuadraticLearner(dim=2), {"theta": jnp.ones(2)}, sampler, key,
                                episodes=4, batch_size=2)
    for dim in range(3, 3 + evaluation.CACHE_SIZE + 4):
        evaluation.evaluate(QuadraticLearner(dim=dim), {"theta": jnp.ones(dim)}, sampler, key,
                            episodes=2, batch_size=2)
    assert len(evaluation._CACHE) <= evaluation.CACHE_SIZE
    assert QuadraticLearner(dim=2) not in evaluation._CACHE  # the oldest left first
    again = evaluation.evaluate(QuadraticLearner(dim=2), {"theta": jnp.ones(2)}, sampler, key,
                                episodes=4, batch_size=2)
    assert again == first


def test_a_loop_registered_outside_the_package_is_a_config_kind_end_to_end(tmp_path):
    """A new outer loop touches only its own module: registered, it is `outer.kind=NAME`
    with its own documented section, and `train` runs and resumes it."""
    import dataclasses

    import jax.numpy as jnp

    from metalearn.config import field_docs
    from metalearn.core import batch_loss
    from metalearn.outer import registry
    from metalearn.outer.base import OuterLoop, OuterState, initial_meta, option
    from metalearn.training import train

    @registry.register("sign_sgd")
    @dataclasses.dataclass
    class SignSGD(OuterLoop):
        """Steps the meta-parameters by -step_size * sign(gradient)."""

        step_size: float = option(0.01, "step along the sign of the gradient")
        batch_size: int = 8
        steps_per_call: int = 10
        shard: bool | None = None

        def init(self, learner, sampler, key, meta=None):
            return OuterState(jnp.asarray(0, jnp.int32), key,
                              initial_meta(learner, sampler, key, meta), ())

        def step(self, learner, sampler, state, mesh=None):
            k = jax.random.fold_in(state.key, state.step)
            eps = jax.vmap(sampler.sample)(jax.random.split(k, self.batch_size))
            (_, m), g = jax.value_and_grad(lambda p: batch_loss(learner, p, eps, k),
                                           has_aux=True)(state.params)
            params = jax.tree.map(lambda p, d: p - self.step_size * jnp.sign(d),
                                  state.params, g)
            return OuterState(state.step + 1, state.key, params, ()), m

        def meta_params(self, state):
            return state.params

    try:
        assert "sign_sgd" in registry.outer_kinds()
        assert field_docs()["outer.sign_sgd.step_size"] == "step along the sign of the gradient"
        sets = ["outer.kind=sign_sgd", "outer.sign_sgd.step_size=0.03", "steps=20",
                "checkpoint_every=10", "eval_every=0"]
        run, summary = train("linreg_sgd", sets, run_dir=tmp_path / "r", progress=False)
        config = json.loads((tmp_path / "r" / "config.json").read_text())
        assert config["outer"]["kind"] == "sign_sgd"
        assert set(config["outer"]) == {"kind", "batch_size", "steps_per_call", "shard",
                                        "sign_sgd"}
        assert config["outer"]["sign_sgd"] == {"step_size": 0.03}
        losses = [r["loss"] for r in run.metrics() if r["split"] == "train"]
        assert np.mean(losses[-5:]) < np.mean(losses[:5])
        with pytest.raises(ValueError, match=r"outer.kind=sign_sgd.*reads outer.sign_sgd"):
            train("linreg_sgd", [*sets, "outer.gradient.clip_norm=1"], progress=False,
                  run_dir=tmp_path / "other")
        _, resumed = train("", ["steps=30"], run_dir=tmp_path / "r", resume=True,
                           progress=False)
        assert resumed["steps"] == 30
        with pytest.raises(ValueError, match="already registered|is already"):
            registry.register("gradient")(SignSGD)
    finally:
        registry._LOOPS.pop("sign_sgd", None)

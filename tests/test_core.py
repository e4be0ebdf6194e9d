"""Core types, losses, checkpoints and config overrides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.checkpoint import Checkpointer, CheckpointError
from metalearn.core import Episode, check_episode, query_loss
from metalearn.evaluation import summarize
from metalearn.experiment import apply_overrides, base_config
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
    apply_overrides(c, ["steps=20", "outer.learning_rate=1e-2", "outer.clip_norm=1",
                        "outer.kind=evolution", "eval_every=5"])
    assert c.steps == 20 and c.outer.learning_rate == 0.01 and c.outer.kind == "evolution"
    assert c.outer.clip_norm == 1
    with pytest.raises(KeyError, match="no field 'stepz'"):
        apply_overrides(c, ["stepz=3"])
    with pytest.raises(KeyError, match="'nope' is not a config section"):
        apply_overrides(c, ["nope.x=3"])
    with pytest.raises(TypeError, match="expected a int"):
        apply_overrides(c, ["steps=abc"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(c, ["steps"])

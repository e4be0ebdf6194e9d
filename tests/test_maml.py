"""MAML: the inner loop and its meta-gradients against closed forms, options, errors, Omniglot."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import Episode, Support
from metalearn.learners.maml import MAML, MAMLNetwork
from metalearn.learners.network import GradientBaseline
from metalearn.learners.protonet import MASKED_LOGIT
from metalearn.nn import CNN, MLP, Linear
from tests.helpers import (
    MINIMAL_NO_VALIDATION,
    assert_manifest_scores_like_memory,
    needs_omniglot,
)
from tests.test_learners import images


def _regression(seed: int = 0, s: int = 7, q: int = 5, d: int = 3) -> Episode:
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return Episode(jax.random.normal(k[0], (s, d)), jax.random.normal(k[1], (s, 1)),
                   jax.random.normal(k[2], (q, d)), jax.random.normal(k[3], (q, 1)))


@pytest.mark.parametrize("first_order", [False, True])
def test_one_step_on_a_linear_model_matches_the_closed_form(first_order):
    """theta' = theta - alpha X^T (X theta - y) / S; d L_Q / d theta = (I - alpha X^T X / S)
    grad L_Q(theta') (second order) or grad L_Q(theta') (first order); d L_Q / d log alpha =
    -alpha <grad L_S(theta), grad L_Q(theta')>."""
    ep = _regression()
    learner = MAML(Linear(), inner_steps=1, inner_lr=0.3, lr_mode="scalar",
                   first_order=first_order)
    meta = learner.init(jax.random.PRNGKey(0), ep)
    meta["params"]["head"] = {"w": jnp.asarray([[0.5], [-1.0], [0.2]]), "b": jnp.asarray([0.1])}
    aug = lambda x: np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
    xs, ys, xq, yq = aug(ep.support_x), np.asarray(ep.support_y), aug(ep.query_x), \
        np.asarray(ep.query_y)
    theta, alpha = np.array([[0.5], [-1.0], [0.2], [0.1]]), 0.3
    g_s = xs.T @ (xs @ theta - ys) / len(xs)
    theta1 = theta - alpha * g_s
    g_q = xq.T @ (xq @ theta1 - yq) / len(xq)
    grad_theta = g_q if first_order else (np.eye(4) - alpha * xs.T @ xs / len(xs)) @ g_q
    grad_log_alpha = -alpha * float(np.sum(g_s * g_q))

    preds = learner.predict(meta, learner.adapt(meta, ep.support(), None), ep.query_x)
    np.testing.assert_allclose(preds, xq @ theta1, rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda m: learner.loss(m, ep, None)[0])(meta)
    got = np.concatenate([grads["params"]["head"]["w"], grads["params"]["head"]["b"][:, None]])
    np.testing.assert_allclose(got, grad_theta, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["log_lr"], grad_log_alpha, rtol=1e-4, atol=1e-7)


def test_meta_sgd_steps_each_weight_by_its_own_rate():
    ep = _regression(1)
    learner = MAML(Linear(), inner_steps=1, lr_mode="per_param")
    meta = learner.init(jax.random.PRNGKey(0), ep)
    rates = jnp.asarray([[0.1], [0.0], [0.5]])
    meta["log_lr"]["head"]["w"] = jnp.log(rates)
    g = jax.grad(lambda p: learner.support_loss(p, ep.support(), None))(meta["params"])
    state = learner.adapt(meta, ep.support(), None)
    np.testing.assert_allclose(state["params"]["head"]["w"], -rates * g["head"]["w"], atol=1e-6)
    assert state["params"]["head"]["w"][1, 0] == 0.0  # a zero rate leaves its weight alone


@pytest.fixture(scope="module")
def cnn_maml():
    sampler = images()
    ep = sampler.sample(jax.random.PRNGKey(5))
    learner = MAML(CNN(channels=4, num_blocks=2, out_dim=5), inner_steps=3, inner_lr=0.2)
    return learner, learner.init(jax.random.PRNGKey(0), ep), ep


def test_inner_loop_lowers_the_support_loss_of_the_cnn(cnn_maml):
    learner, meta, ep = cnn_maml
    state = jax.jit(learner.adapt)(meta, ep.support(), None)
    before = learner.support_loss(meta["params"], ep.support(), state["present"])
    after = learner.support_loss(state["params"], ep.support(), state["present"])
    assert float(after) < 0.8 * float(before), (before, after)


def test_classes_without_support_examples_are_masked(cnn_maml):
    learner, meta, ep = cnn_maml  # 3-way episodes, a 5-way head
    logits = jax.jit(lambda m, s, q: learner.predict(m, learner.adapt(m, s, None), q))(
        meta, ep.support(), ep.query_x)
    assert logits.shape == (ep.query_x.shape[0], 5)
    assert np.all(np.asarray(logits[:, 3:]) == MASKED_LOGIT)
    assert np.all(np.asarray(logits[:, :3]) > MASKED_LOGIT / 2)


def test_a_query_is_scored_alone(cnn_maml):
    learner, meta, ep = cnn_maml
    f = jax.jit(lambda q: learner.predict(meta, learner.adapt(meta, ep.support(), None), q))
    together = f(ep.query_x)
    np.testing.assert_allclose(f(ep.query_x[:1])[0], together[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f(ep.query_x[::-1])[::-1], together, rtol=1e-5, atol=1e-5)


def test_anil_adapts_the_head_only(cnn_maml):
    learner, _, ep = cnn_maml
    anil = MAML(learner.model, inner_steps=2, anil=True)
    meta = anil.init(jax.random.PRNGKey(0), ep)
    state = jax.jit(anil.adapt)(meta, ep.support(), None)
    for a, b in zip(jax.tree.leaves(state["params"]["blocks"]),
                    jax.tree.leaves(meta["params"]["blocks"]), strict=True):
        assert np.array_equal(a, b)
    assert not np.allclose(state["params"]["head"]["w"], meta["params"]["head"]["w"])


@pytest.mark.slow  # 15 s; the orders' math: the linear closed form; conv2d's second
# derivatives: test_nn
def test_second_and_first_order_meta_gradients_differ_on_the_cnn(cnn_maml):
    learner, meta, ep = cnn_maml
    fo = MAML(learner.model, inner_steps=3, inner_lr=0.2, first_order=True)
    g2 = jax.jit(jax.grad(lambda m: learner.loss(m, ep, None)[0]))(meta)
    g1 = jax.jit(jax.grad(lambda m: fo.loss(m, ep, None)[0]))(meta)
    w2, w1 = g2["params"]["blocks"][0]["w"], g1["params"]["blocks"][0]["w"]
    assert np.all(np.isfinite(w2)) and np.all(np.isfinite(w1))
    assert not np.allclose(w2, w1, rtol=1e-3, atol=1e-6)
    # with no inner step both are the plain gradient of the query loss at theta
    z2, z1 = (jax.jit(jax.grad(lambda m, lr=lr: lr.loss(m, ep, None)[0]))(meta)
              for lr in (MAML(learner.model, inner_steps=0),
                         MAML(learner.model, inner_steps=0, first_order=True)))
    for a, b in zip(jax.tree.leaves(z2), jax.tree.leaves(z1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_evaluation_learner_takes_its_own_number_of_steps():
    learner = MAML(Linear(), inner_steps=5, eval_inner_steps=10)
    assert learner.for_evaluation().inner_steps == 10
    assert MAML(Linear(), inner_steps=5).for_evaluation().inner_steps == 5


def test_bad_settings_fail_with_clear_messages(cnn_maml):
    _, _, ep = cnn_maml
    with pytest.raises(ValueError, match=r"out_dim >= 3 \(the number of ways\)"):
        MAML(CNN(4, 2, out_dim=2)).init(jax.random.PRNGKey(0), ep)
    with pytest.raises(ValueError, match="has no head"):
        MAML(CNN(4, 2), anil=True).init(jax.random.PRNGKey(0), ep)
    with pytest.raises(ValueError, match="set the model's out_dim to 1"):
        MAML(MLP((4,), out_dim=2)).init(jax.random.PRNGKey(0), _regression())
    with pytest.raises(ValueError, match="lr_mode"):
        MAML(Linear(), lr_mode="adam")
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(Linear(), inner_lr=0.0)
    with pytest.raises(TypeError, match="metalearn.nn.Model"):
        MAML(lambda p, x: x)  # type: ignore[arg-type]


def test_regression_state_has_no_class_mask_nor_statistics():
    """A linear model on regression targets: no masked columns, no batch statistics."""
    ep = _regression()
    learner = MAML(Linear(), inner_steps=1)
    meta = learner.init(jax.random.PRNGKey(0), ep)
    state = learner.adapt(meta, Support(ep.support_x, ep.support_y), None)
    assert state["present"] is None and state["stats"] is None


# ---------------------------------------------------------------- on the learned rules' network

KEY0 = jax.random.PRNGKey(0)
NET = {"ways": 3, "hidden": (6,), "inner_steps": 3, "hidden_activation": "tanh",
       "output_activation": "identity", "meta_loss": "cross_entropy"}


def _drawn_weights(learner, key, d_in):
    """The initial weights a `Network` learner draws for an episode's key (one replica)."""
    k_init = jax.random.split(key)[0]
    return [s["F"][0] for s in learner.synapses(jax.random.split(k_init, 1)[0], d_in)]


def test_maml_network_from_the_drawn_weights_is_sgd():
    """theta set to the weights SGD's baseline draws for a key: the same T steps, the same
    predictions, at every inner step of the curve."""
    ep = images().sample(jax.random.PRNGKey(4))
    key = jax.random.PRNGKey(5)
    sgd = GradientBaseline(optimizer="sgd", learning_rate=0.3, **NET)
    maml = MAMLNetwork(inner_lr=0.3, **NET)
    meta = maml.init(jax.random.PRNGKey(0), ep)
    meta["weights"] = _drawn_weights(sgd, key, int(np.prod(ep.support_x.shape[1:])))
    np.testing.assert_allclose(
        maml.predict(meta, maml.adapt(meta, ep.support(), key), ep.query_x),
        sgd.predict({}, sgd.adapt({}, ep.support(), key), ep.query_x), rtol=1e-5, atol=1e-6)
    got, want = maml.curve(meta, ep, key, 5), sgd.curve({}, ep, key, 5)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)


def test_maml_network_inner_steps_follow_the_update_rule():
    """theta_{t+1} = theta_t - alpha * grad L_S(theta_t), alpha per weight for Meta-SGD; with
    every per-weight rate at inner_lr, Meta-SGD is MAML."""
    ep = images().sample(jax.random.PRNGKey(6))
    maml = MAMLNetwork(inner_lr=0.2, **NET)
    meta = maml.init(jax.random.PRNGKey(1), ep)
    x = ep.support_x.reshape(len(ep.support_x), -1)
    w = meta["weights"]
    for _ in range(NET["inner_steps"]):
        g = jax.grad(maml.train_loss)(w, x, maml.codes(ep.support_y))
        w = [a - 0.2 * b for a, b in zip(w, g, strict=True)]
    state = maml.adapt(meta, ep.support(), KEY0)
    for a, b in zip(state, w, strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)  # replica 0
    meta_sgd = MAMLNetwork(inner_lr=0.2, lr_mode="per_param", **NET)
    m2 = meta_sgd.init(jax.random.PRNGKey(1), ep)
    assert [a.shape for a in m2["log_lr"]] == [a.shape for a in m2["weights"]]
    np.testing.assert_allclose(meta_sgd.loss(m2, ep, KEY0)[0], maml.loss(meta, ep, KEY0)[0],
                               rtol=1e-6)
    # a rate of zero on one layer freezes it
    m2["log_lr"][0] = jnp.full_like(m2["log_lr"][0], -jnp.inf)
    frozen = meta_sgd.adapt(m2, ep.support(), KEY0)
    np.testing.assert_array_equal(frozen[0][0], m2["weights"][0])


@pytest.mark.slow  # compiles two meta-gradients; the conformance suite checks them by default
def test_maml_network_meta_training_lowers_the_query_loss_and_orders_differ():
    """Adam on theta lowers the mean query loss of a batch of tasks; the first-order
    meta-gradient is not the second-order one."""
    import optax

    sampler = images()
    batch = sampler.sample_batch(jax.random.PRNGKey(7), 8)
    maml = MAMLNetwork(inner_lr=0.3, **NET)
    meta = maml.init(jax.random.PRNGKey(2), sampler.example())

    def batch_loss(m, lrn=maml):
        return jnp.mean(jax.vmap(lambda e: lrn.loss(m, e, KEY0)[0])(batch))

    tx = optax.adam(1e-2)
    opt, m = tx.init(meta), meta
    grad = jax.jit(jax.value_and_grad(batch_loss))
    losses = []
    for _ in range(30):
        loss, g = grad(m)
        upd, opt = tx.update(g, opt, m)
        m = optax.apply_updates(m, upd)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]
    fo = MAMLNetwork(inner_lr=0.3, first_order=True, **NET)
    g2 = jax.grad(batch_loss)(meta)
    g1 = jax.grad(lambda m: batch_loss(m, fo))(meta)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True))
    assert diff > 1e-4


def test_maml_network_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"MAMLNetwork.lr_mode='adam'"):
        MAMLNetwork(lr_mode="adam")
    with pytest.raises(ValueError, match=r"MAMLNetwork.inner_lr must be > 0"):
        MAMLNetwork(inner_lr=0.0)


# ---------------------------------------------------------------- real data, end to end


@pytest.mark.slow  # 60 s; protonet_omniglot's end-to-end test covers the same CLI paths
@needs_omniglot
def test_maml_omniglot_trains_evaluates_and_reads_manifests(tmp_path, capsys):
    from metalearn.cli import main
    from metalearn.reload import evaluate_run, load_run
    from metalearn.training import train

    sets = ["steps=4", "eval_every=0", "eval_episodes=4", "checkpoint_every=0",
            "test_episodes=4", "report_episodes=4", "report_settings=5x1x3",
            "learner.channels=4", "learner.inner_steps=1", "learner.eval_inner_steps=2",
            "learner.first_order=true",
            "task.ways=5", "task.queries=2", "task.eval_queries=2", "outer.batch_size=2",
            "outer.steps_per_call=4", *MINIMAL_NO_VALIDATION]
    run, summary = train("maml_omniglot", sets, run_dir=tmp_path / "run", progress=False)
    assert summary["test"]["episodes"] == 4 and "test_5way_1shot" in summary
    assert len([r for r in run.metrics() if r["split"] == "train"]) == 4
    loaded = load_run(run.path)
    assert loaded.step == 4 and loaded.evaluator.inner_steps == 2
    assert loaded.learner.inner_steps == 1
    assert main(["evaluate", str(run.path), "--episodes", "4", "--ways", "3"]) == 0
    assert "test ways=3" in capsys.readouterr().out
    # more ways than the 5-way head has: refused, nothing written
    with pytest.raises(ValueError, match=r"cannot be evaluated with ways=6: .*out_dim >= 6"):
        evaluate_run(run.path, episodes=2, ways=6)
    assert not list(run.path.glob("eval_test_6way*"))
    assert_manifest_scores_like_memory(run.path, tmp_path)
    assert json.loads((run.path / "config.json").read_text())["learner"]["channels"] == 4


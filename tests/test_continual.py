"""The Continual HyperTransformer's recursion and losses against a step-by-step reference, the
task- and class-incremental masking, and the continual sampler's class bookkeeping."""

from __future__ import annotations

import dataclasses
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import Episode
from metalearn.learners.continual import ConstPN, ContinualHyperTransformer, label_logits
from metalearn.learners.hypertransformer import HyperTransformer
from metalearn.learners.protonet import MASKED_LOGIT
from metalearn.tasks.continual import ContinualSampler
from metalearn.tasks.fewshot import FewShotSampler
from metalearn.tasks.testing import synthetic_dataset
from tests.helpers import MINIMAL_NO_VALIDATION, needs_omniglot

T, N, K, Q = 3, 3, 2, 2
SMALL = dict(channels=4, num_blocks=1, embed_dim=8, shared_features=4, local_features=4,
             num_layers=1)


@cache
def base() -> FewShotSampler:
    return FewShotSampler(synthetic_dataset(classes=16, examples=6, size=8), N, K, Q)


@cache
def sequence() -> Episode:
    return ContinualSampler(base(), tasks=T).sample(jax.random.PRNGKey(0))


@cache
def cht() -> tuple[ContinualHyperTransformer, dict]:
    learner = ContinualHyperTransformer(ways=N, tasks=T, **SMALL)
    meta = learner.init(jax.random.PRNGKey(1), sequence())
    # a nonzero theta_{-1}, so that feeding weights back is not a no-op anywhere
    meta["initial"] = [jax.random.normal(jax.random.PRNGKey(2), a.shape) for a in
                       meta["initial"]]
    return learner, meta


def _chunk(a, t, n):
    return a[t * n:(t + 1) * n]


@pytest.mark.slow
def test_theta_t_depends_on_theta_t_minus_1_and_s_t_only():
    learner, meta = cht()
    ep = sequence()
    other = jax.random.uniform(jax.random.PRNGKey(9), ep.support_x[:N * K].shape)
    changed = ep.support_x.at[:N * K].set(other)  # a different S_0
    rec = jax.jit(learner.generated)
    a = rec(meta, ep.support())
    b = rec(meta, ep.support()._replace(x=changed))
    w = lambda g: np.asarray(g["blocks"][0]["w"])
    assert not np.allclose(w(a[0]), w(b[0]))
    assert not np.allclose(w(a[1]), w(b[1]))  # S_0 reaches theta_1 through theta_0
    indep = dataclasses.replace(learner, recurrent=False)
    gen = jax.jit(indep.generated)
    c = gen(meta, ep.support())
    d = gen(meta, ep.support()._replace(x=changed))
    np.testing.assert_array_equal(w(c[1]), w(d[1]))  # without the recursion it does not
    # a later support set leaves the earlier weights alone
    late = ep.support_x.at[-N * K:].set(other)
    e = rec(meta, ep.support()._replace(x=late))
    np.testing.assert_array_equal(w(a[0]), w(e[0]))
    np.testing.assert_array_equal(w(a[1]), w(e[1]))


@pytest.mark.slow
def test_one_task_with_zero_initial_weights_is_the_hypertransformer():
    """T = 1 and theta_{-1} = 0: the conv weights are the HyperTransformer's, generated from the
    same meta-parameters; the loss is ProtoNet's on the generated CNN's embeddings."""
    ep = ContinualSampler(base(), tasks=1).sample(jax.random.PRNGKey(3))
    learner = ContinualHyperTransformer(ways=N, tasks=1, **SMALL)
    meta = learner.init(jax.random.PRNGKey(4), ep)
    assert all(not np.any(a) for a in meta["initial"])
    ht = HyperTransformer(ways=N, **SMALL)
    y = learner._within(ep.support_y)[1]
    ht_meta = {**ht.init(jax.random.PRNGKey(4), ep._replace(support_y=y)), **{
        k: meta[k] for k in ("cnn", "shared")}}
    ht_meta["generators"] = meta["generators"] + ht_meta["generators"][-1:]
    want = ht.generated(ht_meta, ep.support()._replace(y=y))["blocks"]
    got = learner.generated(meta, ep.support())[0]["blocks"]
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(g["w"], h["w"], rtol=1e-5, atol=1e-6)
    # the loss: cross-entropy of -||f(q) - c_k||^2 over the task's prototypes
    emb_s, stats = learner.embedding.apply({"blocks": got}, ep.support_x)
    emb_q, _ = learner.embedding.apply({"blocks": got}, ep.query_x, stats)
    qy = learner._within(ep.support_y)[1][0] * 0 + jnp.searchsorted(
        learner._within(ep.support_y)[0], ep.query_y)
    protos = jnp.stack([emb_s[y == k].mean(0) for k in range(N)])
    logits = -jnp.sum((emb_q[:, None] - protos[None]) ** 2, -1)
    nll = -jax.nn.log_softmax(logits)[jnp.arange(len(qy)), qy]
    loss, metrics = learner.loss(meta, ep, None)
    np.testing.assert_allclose(loss, jnp.mean(nll), rtol=1e-4)
    np.testing.assert_allclose(metrics["accuracy"], jnp.mean(jnp.argmax(logits, 1) == qy))


@pytest.mark.parametrize("prototypes", ["frozen", pytest.param("recomputed",
                                                                marks=pytest.mark.slow)])
def test_unroll_matches_a_step_by_step_reference(prototypes):
    learner, meta = cht()
    learner = dataclasses.replace(learner, prototypes=prototypes)
    ep = sequence()
    thetas = jax.jit(learner.generated)(meta, ep.support())
    apply = jax.jit(learner.embedding.apply)

    def embed_fn(t):
        stats = apply(thetas[t], _chunk(ep.support_x, t, N * K))[1]
        return lambda x: np.asarray(apply(thetas[t], x, stats)[0])

    want = {k: np.zeros((T, T)) for k in ("ci_accuracy", "ti_accuracy", "ci_loss", "ti_loss")}
    for t in range(T):
        f = embed_fn(t)
        protos, plabels, ptask = [], [], []
        for s in range(t + 1):
            g = f if prototypes == "recomputed" else embed_fn(s)
            xs, ys = _chunk(ep.support_x, s, N * K), np.asarray(_chunk(ep.support_y, s, N * K))
            e = g(xs)
            for c in np.unique(ys):
                protos.append(e[ys == c].mean(0))
                plabels.append(c)
                ptask.append(s)
        protos, plabels, ptask = map(np.asarray, (protos, plabels, ptask))
        for tau in range(t + 1):
            eq = f(_chunk(ep.query_x, tau, N * Q))
            qy = np.asarray(_chunk(ep.query_y, tau, N * Q))
            d = -((eq[:, None] - protos[None]) ** 2).sum(-1)
            for kind, allowed in (("ci", np.ones(len(protos), bool)), ("ti", ptask == tau)):
                classes = plabels[allowed]  # every class once here (no class comes back)
                lg = d[:, allowed]
                logp = lg - np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1,
                                   keepdims=True)) - lg.max(1, keepdims=True)
                col = np.array([list(classes).index(y) for y in qy])
                want[f"{kind}_loss"][t, tau] = -logp[np.arange(len(qy)), col].mean()
                want[f"{kind}_accuracy"][t, tau] = np.mean(classes[lg.argmax(1)] == qy)
    got = jax.jit(learner.unroll)(meta, ep)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=2e-3, atol=2e-4, err_msg=k)
    loss, metrics = learner.loss(meta, ep, None)
    np.testing.assert_allclose(loss, want["ci_loss"].sum() / (T * (T + 1) / 2), rtol=1e-3)
    np.testing.assert_allclose(metrics["accuracy"], want["ci_accuracy"][-1].mean(), atol=1e-6)


@pytest.mark.slow
def test_merged_ht_generates_from_every_support_set_so_far():
    learner, meta = cht()
    merged = dataclasses.replace(learner, merged=True)
    ep = sequence()
    a, b = jax.jit(learner.unroll)(meta, ep), jax.jit(merged.unroll)(meta, ep)
    for k in a:  # after the first task both have seen S_0 alone, from theta_{-1}
        np.testing.assert_allclose(a[k][0], b[k][0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(a["ci_loss"][-1], b["ci_loss"][-1])
    got = jax.jit(merged.generated)(meta, ep.support())[1]["blocks"]
    x = ep.support_x[:2 * N * K]
    y = jnp.concatenate([merged._within(ep.support_y[:N * K])[1],
                         merged._within(ep.support_y[N * K:2 * N * K])[1]])
    want = merged._generate_blocks(meta, x, y, 2 * N * K, meta["initial"])[0]
    np.testing.assert_allclose(got[0]["w"], want[0]["w"], rtol=1e-5, atol=1e-6)


def test_class_incremental_logits_pool_a_class_and_task_incremental_mask_others():
    d = jnp.array([[-1.0, -2.0, -3.0, -4.0]])  # one query, four prototypes
    labels = jnp.array([0, 1, 0, 4])  # class 0 has two prototypes; label 4 = none
    everything = jnp.ones((1, 4), bool)
    out = label_logits(d, labels, everything, 4)
    np.testing.assert_allclose(out[0, 0], jnp.logaddexp(-1.0, -3.0), rtol=1e-6)
    assert out[0, 1] == -2.0 and out[0, 2] == MASKED_LOGIT and out[0, 3] == MASKED_LOGIT
    task_only = jnp.array([[False, True, True, False]])  # the query's task: prototypes 1, 2
    out = label_logits(d, labels, task_only, 4)
    assert out[0, 0] == -3.0 and out[0, 1] == -2.0


def test_frozen_and_recomputed_agree_for_a_fixed_embedding():
    """ConstPN's embedding does not change with the task, except its batch statistics: with
    one task there is nothing to recompute."""
    ep = ContinualSampler(base(), tasks=1).sample(jax.random.PRNGKey(5))
    a = ConstPN(ways=N, tasks=1, channels=4, num_blocks=2)
    meta = a.init(jax.random.PRNGKey(0), ep)
    b = dataclasses.replace(a, prototypes="recomputed")
    np.testing.assert_allclose(a.loss(meta, ep, None)[0], b.loss(meta, ep, None)[0], rtol=1e-5)


# ----- the sampler


def _refs(sampler, seed=0):
    s, q, chosen = jax.jit(sampler.sample_refs)(jax.random.PRNGKey(seed))
    return jax.tree.map(np.asarray, s), jax.tree.map(np.asarray, q), np.asarray(chosen)


@pytest.mark.parametrize("pool", [0, 5, N])
def test_sampler_class_bookkeeping(pool):
    sampler = ContinualSampler(base(), tasks=T, pool=pool)
    s, q, chosen = _refs(sampler)
    P = pool or T * N
    assert len(set(chosen.tolist())) == P
    for t in range(T):
        ys, yq = _chunk(s.label, t, N * K), _chunk(q.label, t, N * Q)
        assert len(set(ys.tolist())) == N and set(yq.tolist()) == set(ys.tolist())
        assert all(np.sum(ys == c) == K for c in set(ys.tolist()))
        for r, y in ((s, ys), (q, yq)):  # a label is one dataset class, in every task
            np.testing.assert_array_equal(_chunk(r.cls, t, len(y)), chosen[y] % 16)
        # support and query images of a class within a task are distinct
        for c in set(ys.tolist()):
            a = _chunk(s.example, t, N * K)[ys == c]
            b = _chunk(q.example, t, N * Q)[yq == c]
            assert len(set(a.tolist()) | set(b.tolist())) == K + Q
    tasks = [set(_chunk(s.label, t, N * K).tolist()) for t in range(T)]
    if pool == 0:  # every task new classes, labels 0..T*N-1 in task order
        assert set().union(*tasks) == set(range(T * N))
        assert all(tasks[t] == set(range(t * N, (t + 1) * N)) for t in range(T))
    elif pool == N:  # every task the same classes
        assert all(x == tasks[0] for x in tasks)
    else:
        assert set().union(*tasks) <= set(range(pool))


def test_the_compiled_batch_sampler_draws_what_sample_batch_draws():
    """(Seeding and jit against eager: tests/test_samplers.py, as for every sampler.)"""
    sampler = ContinualSampler(base(), tasks=T)
    batch = sampler.batch_sampler(4)(jax.random.PRNGKey(9))  # the images an argument
    ref = sampler.sample_batch(jax.random.PRNGKey(9), 4)
    for x, y in zip(batch, ref, strict=True):
        np.testing.assert_array_equal(x, y)
    assert batch.support_x.shape == (4, T * N * K, 8, 8, 1)
    assert batch.query_x.shape == (4, T * N * Q, 8, 8, 1)


def test_sampler_and_learner_errors_name_the_fix():
    with pytest.raises(ValueError, match="pool=20 classes must lie between"):
        ContinualSampler(base(), tasks=2, pool=20)
    with pytest.raises(ValueError, match="the dataset has 16"):
        ContinualSampler(base(), tasks=6)
    with pytest.raises(ValueError, match="multiple of tasks x ways"):
        ContinualHyperTransformer(ways=N, tasks=4, **SMALL).init(jax.random.PRNGKey(0),
                                                                 sequence())
    with pytest.raises(ValueError, match="prototypes='stale'"):
        ConstPN(prototypes="stale")
    with pytest.raises(ValueError, match="no logits layer"):
        ContinualHyperTransformer(num_blocks=2, trained_blocks=2)
    learner, meta = cht()
    with pytest.raises(TypeError, match="generated"):
        learner.conv_slices(meta, sequence().support())


@pytest.mark.slow
@needs_omniglot
def test_cht_omniglot_trains_reports_and_evaluates(tmp_path, capsys):
    """`cht_omniglot` end to end on the minimal Omniglot: train (CHT), train (ConstPN), the
    CHT report with the ConstPN run on its sequences, `metalearn evaluate`."""
    from metalearn.cli import main
    from metalearn.training import train

    sets = ["steps=2", "eval_every=0", "checkpoint_every=0", "test_episodes=3",
            "report_episodes=3", "eval_batch_size=3", "task.tasks=2", "task.eval_tasks=3",
            "learner.channels=4", "learner.num_layers=1", "learner.embed_dim=8",
            "learner.shared_features=4", "learner.local_features=4", "outer.steps_per_call=2",
            *MINIMAL_NO_VALIDATION]
    pn, _ = train("cht_omniglot", [*sets, "learner.method=constpn"],
                  run_dir=tmp_path / "constpn", progress=False)
    run, summary = train("cht_omniglot", [*sets, f"report_baselines={pn.path}"],
                         run_dir=tmp_path / "cht", progress=False)
    curves = summary["curves"]
    assert set(curves) == {"CHT", "independent HT", "ConstPN (constpn)"}
    for c in curves.values():
        assert len(c["ci_seen"]) == 3 and len(c["mb_seen"]) == 3
        assert c["ti_first"][0] == c["ci_seen"][0]  # one task: the two scenarios agree
    assert (run.path / "plots" / "continual.png").exists()
    assert main(["evaluate", str(run.path), "--episodes", "3"]) == 0
    assert "task_accuracy" in capsys.readouterr().out

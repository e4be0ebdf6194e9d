"""The multi-state Hebbian learner: the gradient genome is backprop + SGD, the rule is the math
of the module docstring (an explicit NumPy reference), the options do what they claim, and the
outer loops start from given genomes and minimise any reported metric. Each test compiles
its own learners (a few seconds each on XLA:CPU), so the checks of the options, truncation,
symmetries, `adapt` and `curve` run with `pytest -m slow` only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import Episode, Support
from metalearn.learners.hebbian import (
    HebbianLearner,
    backprop_learner,
    gradient_genome,
    random_genome,
)
from metalearn.learners.network import GradientBaseline
from metalearn.outer.evolution import EvolutionOuterLoop
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.functions2d import Functions2D


def _mlp(ws, x, f):
    a = x
    for c, w in enumerate(ws):
        z = a @ w[:-1] + w[-1]
        a = z if c == len(ws) - 1 else f(z)
    return a


@pytest.mark.slow  # compiling-heavy; the default suite keeps under 10 min
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_gradient_genome_steps_are_sgd_steps_of_backprop(activation):
    """Several inner steps on different batches, two hidden layers: the forward weights
    F[..., 0] follow SGD on 1/2 sum ||y_hat - y||^2 exactly, and the outputs are the MLP's."""
    lr = 0.05
    learner = backprop_learner(hidden=(7, 5), ways=3, activation=activation)
    genome = gradient_genome(lr)
    syn = jax.jit(learner.init_state, static_argnums=2)(genome, jax.random.PRNGKey(0), 4)
    f = jnp.tanh if activation == "tanh" else jax.nn.sigmoid
    ws = [s["F"][0] for s in syn]
    update = jax.jit(learner.update)
    grad = jax.jit(jax.grad(lambda p, x, y: 0.5 * jnp.sum((_mlp(p, x, f) - y) ** 2)))
    xs = jax.random.normal(jax.random.PRNGKey(10), (4, 6, 4))
    ys = jax.random.normal(jax.random.PRNGKey(20), (4, 6, 3))
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        g = grad(ws, x, y)
        ws = [w - lr * gi for w, gi in zip(ws, g, strict=True)]
        syn = update(genome, syn, x, y, jnp.int32(t))
        for c, (s, w) in enumerate(zip(syn, ws, strict=True)):
            np.testing.assert_allclose(s["F"][0], w, atol=2e-6)  # the SGD iterate
            np.testing.assert_allclose(s["F"][1], w, atol=2e-6)  # symmetric states
            if c:  # G^0 is never read (the input layer takes no feedback)
                np.testing.assert_allclose(s["G"][0], w[:-1].T, atol=2e-6)  # G = F^T
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 4))
    np.testing.assert_allclose(learner.outputs(genome, syn, x), _mlp(ws, x, f), atol=2e-6)


@pytest.mark.slow
def test_gradient_genome_adapt_is_sgd_on_the_support_codes():
    """`adapt` (lax.scan, full-batch steps) + `predict` = T SGD steps on the support set's
    target codes, then the MLP on the queries."""
    learner = backprop_learner(hidden=(6,), ways=2, inner_steps=3)
    genome = gradient_genome(0.02)
    ep = Functions2D(families=("xor", "circle"), num_support=16, num_queries=8).sample(
        jax.random.PRNGKey(1))
    key = jax.random.PRNGKey(2)
    state = learner.adapt(genome, ep.support(), key)
    # the same initial synapses as adapt draws (replica 0 of its init key)
    k_init = jax.random.split(key)[0]
    syn = learner.init_state(genome, jax.random.split(k_init, 1)[0], 2)
    ws = [s["F"][0] for s in syn]
    y = learner.codes(ep.support_y)
    for _ in range(3):
        g = jax.grad(lambda p: 0.5 * jnp.sum((_mlp(p, ep.support_x, jnp.tanh) - y) ** 2))(ws)
        ws = [w - 0.02 * gi for w, gi in zip(ws, g, strict=True)]
    np.testing.assert_allclose(learner.predict(genome, state, ep.query_x),
                               _mlp(ws, ep.query_x, jnp.tanh), atol=2e-6)


def _reference_step(g, syn, x, y, mode):
    """One inner step of the rule written out with explicit loops over units (NumPy), with
    synapses F [n_c + 1, n_{c+1}, k] and G [n_{c+1}, n_c, k] (states last, as in the paper)."""
    g = {k: np.asarray(v, np.float64) for k, v in g.items()}
    F = [np.moveaxis(np.asarray(s["F"], np.float64), 0, -1) for s in syn]
    G = [np.moveaxis(np.asarray(s["G"], np.float64), 0, -1) for s in syn]
    relu_tanh = lambda v: np.maximum(np.tanh(v), 0.0)  # noqa: E731
    B, k = x.shape[0], g["nu"].shape[0]
    a = [np.zeros((B, x.shape[1], k))]
    a[0][..., 0] = x
    for c in range(len(F)):
        pre = np.concatenate([a[c], np.ones((B, 1, k))], axis=1)
        n_out = F[c].shape[1]
        d = np.zeros((B, n_out, k))
        for b in range(B):
            for j in range(n_out):
                for l_ in range(k):
                    d[b, j, l_] = sum(pre[b, i, s] * g["nu"][s, l_] * F[c][i, j, l_]
                                      for i in range(pre.shape[1]) for s in range(k))
        act = np.tanh if c == len(F) - 1 else relu_tanh
        a.append(act(g["neuron_update"] * d))
    a[-1][..., 1] = y  # feedback: (a_0, y, 0, ..., 0)
    a[-1][..., 2:] = 0.0
    for c in range(len(F) - 1, 0, -1):
        d = np.einsum("bjs,sl,jil->bil", a[c + 1], g["mu"], G[c])
        if mode == "additive":
            a[c] = relu_tanh(g["neuron_keep"] * a[c] + g["neuron_update"] * d)
        else:
            a[c] = relu_tanh(g["neuron_keep"] * a[c] * d)
    out = []
    for c in range(len(F)):
        n = np.concatenate([a[c], np.ones((B, 1, k)), a[c + 1]], axis=1)  # [pre; 1; post]
        h = np.zeros((n.shape[1], n.shape[1], k))
        for b in range(B):
            for o in range(k):
                h[:, :, o] += np.outer(n[b] @ g["pre"][:, o], n[b] @ g["post"][o, :])
        p = a[c].shape[1] + 1
        out.append({"F": g["synapse_keep"] * F[c] + g["synapse_update"] * h[:p, p:],
                    "G": g["synapse_keep"] * G[c] + g["synapse_update"] * h[p:, :p - 1]})
    return out


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_one_step_matches_the_equations(mode):
    """Forward, label feedback, backward and the batch-summed Hebbian update of a random k = 3
    genome equal the module docstring's equations written out unit by unit."""
    learner = HebbianLearner(ways=2, hidden=(4,), states=3, backward_update=mode)
    genome = random_genome(jax.random.PRNGKey(0), 3, std=0.7, synapse_update=0.1)
    genome = {**genome, "neuron_keep": jnp.float32(0.8), "synapse_keep": jnp.float32(0.9)}
    syn = learner.init_state(genome, jax.random.PRNGKey(1), 3)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (5, 3)))
    y = np.asarray(learner.codes(jnp.array([0, 1, 1, 0, 1])))
    got = learner.update(genome, syn, jnp.asarray(x), jnp.asarray(y), jnp.int32(0))
    want = _reference_step(genome, syn, x, y, mode)
    for c, (s, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(np.moveaxis(s["F"], 0, -1), w["F"], rtol=1e-5, atol=1e-6)
        if c:  # G^0 is never read, so it is not updated
            np.testing.assert_allclose(np.moveaxis(s["G"], 0, -1), w["G"], rtol=1e-5,
                                       atol=1e-6)


def _support(n=12, key=3):
    ep = Functions2D(families=("moons",), num_support=n, num_queries=n).sample(
        jax.random.PRNGKey(key))
    return ep, Support(ep.support_x, ep.support_y)


@pytest.mark.slow
def test_symmetry_options_hold_after_updates():
    learner = HebbianLearner(hidden=(5, 4), states=3, inner_steps=3, symmetric_synapses=True,
                             symmetric_states=True)
    genome = random_genome(jax.random.PRNGKey(0), 3, synapse_update=0.05)
    _, support = _support()
    syn = jax.tree.map(lambda a: a[0], learner.adapt(genome, support, jax.random.PRNGKey(1)))
    for c, s in enumerate(syn):
        if c:  # G^0 is never read
            np.testing.assert_array_equal(s["G"], jnp.swapaxes(s["F"][:, :-1], 1, 2))
        for o in range(1, 3):
            np.testing.assert_array_equal(s["F"][o], s["F"][0])


@pytest.mark.slow
def test_normalised_synapses_make_the_network_scale_free():
    """With synapse normalisation, scaling every initial synapse by a positive factor changes
    no output (each unit's incoming weights are renormalised before use)."""
    learner = HebbianLearner(hidden=(6,), normalize_synapses=True, inner_steps=2)
    genome = learner.init(jax.random.PRNGKey(0), _support()[0])
    assert "rescale_to" in genome
    ep, support = _support()
    syn = learner.init_state(genome, jax.random.PRNGKey(1), 2)
    y = learner.codes(support.y)
    a = learner.update(genome, syn, support.x, y, jnp.int32(0))
    b = learner.update(genome, jax.tree.map(lambda w: 3.0 * w, syn), support.x, y, jnp.int32(0))
    np.testing.assert_allclose(learner.outputs(genome, a, ep.query_x),
                               learner.outputs(genome, b, ep.query_x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_oja_and_saturation_bound_the_synapses():
    """Oja decay and exp-saturation keep synapses smaller than the plain rule does, for a
    genome whose plain updates make them grow (at a rate where discrete Oja is stable)."""
    _, support = _support(32)
    norms = {}
    for name, kw in (("plain", {}), ("oja", {"oja": True}), ("saturation", {"saturation": True})):
        learner = HebbianLearner(hidden=(6,), inner_steps=6, **kw)
        genome = learner.named_meta("gradient:0.05")
        genome["post"] = jnp.eye(2)  # Hebbian growth: post-synaptic activity times pre
        syn = learner.adapt(genome, support, jax.random.PRNGKey(0))
        norms[name] = float(sum(jnp.sum(jnp.abs(s["F"])) for s in syn))
    assert norms["oja"] < norms["plain"] and norms["saturation"] < norms["plain"], norms


@pytest.mark.slow
def test_truncation_cuts_the_meta_gradient():
    """truncate = T is the full unroll; truncate = 1 changes the meta-gradient."""
    ep, _ = _support(16)
    grads = {}
    for tr in (0, 3, 1):
        learner = HebbianLearner(hidden=(5,), inner_steps=3, truncate=tr)
        genome = random_genome(jax.random.PRNGKey(0), 2, std=0.5, synapse_update=0.05)
        grads[tr] = jax.grad(lambda g, learner=learner: learner.loss(
            g, ep, jax.random.PRNGKey(1))[0])(genome)
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[3]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True))


@pytest.mark.slow
def test_curve_matches_loss_and_baselines_learn():
    """`curve` at step T is what `loss` reports; SGD's query loss falls over the steps."""
    ep, _ = _support(32)
    learner = HebbianLearner(hidden=(8,), inner_steps=3)
    genome = learner.init(jax.random.PRNGKey(0), ep)
    c = learner.curve(genome, ep, jax.random.PRNGKey(1), 6)
    loss, m = learner.loss(genome, ep, jax.random.PRNGKey(1))
    assert c["accuracy"].shape == (7,)
    np.testing.assert_allclose(c["loss"][3], loss, rtol=1e-5)
    np.testing.assert_allclose(c["accuracy"][3], m["accuracy"], rtol=1e-6)
    sgd = GradientBaseline(hidden=(8,), inner_steps=20, learning_rate=0.5)
    c = sgd.curve({}, ep, jax.random.PRNGKey(1), 20)
    assert float(c["loss"][-1]) < 0.8 * float(c["loss"][0])
    # a rate given as a meta-parameter (one program for a sweep) replaces the field's
    swept = jax.jit(lambda m: GradientBaseline(hidden=(8,), inner_steps=20).curve(
        m, ep, jax.random.PRNGKey(1), 20))
    np.testing.assert_array_equal(swept({"learning_rate": jnp.float32(0.5)})["loss"],
                                  jax.jit(lambda: sgd.curve({}, ep, jax.random.PRNGKey(1), 20))()
                                  ["loss"])


def test_named_genome_and_bad_settings():
    learner = HebbianLearner(states=3, oja=True)
    g = learner.named_meta("gradient:0.05")
    assert g["nu"].shape == (3, 3) and float(g["synapse_update"]) == pytest.approx(0.05)
    np.testing.assert_array_equal(g["post"][:2, :2], [[0, 1], [1, 0]])
    assert "oja" in g
    with pytest.raises(ValueError, match="gradient:LR"):
        learner.named_meta("backprop")
    with pytest.raises(ValueError, match="states must be >= 2"):
        HebbianLearner(states=1)
    with pytest.raises(ValueError, match="backward_update"):
        HebbianLearner(backward_update="sideways")
    with pytest.raises(ValueError, match="hidden_activation"):
        HebbianLearner(hidden_activation="swish")
    with pytest.raises(ValueError, match="ways >= 3"):
        HebbianLearner(ways=2).init(jax.random.PRNGKey(0), Episode(
            jnp.zeros((3, 2)), jnp.array([0, 1, 2]), jnp.zeros((1, 2)), jnp.array([0])))
    with pytest.raises(ValueError, match="classification"):
        HebbianLearner().init(jax.random.PRNGKey(0), Episode(
            jnp.zeros((3, 2)), jnp.zeros((3,)), jnp.zeros((1, 2)), jnp.zeros((1,))))


def test_outer_loops_start_from_a_given_genome_and_minimise_the_chosen_metric():
    sampler = Functions2D(families=("or",), num_support=16, num_queries=16)
    learner = HebbianLearner(hidden=(4,), inner_steps=2)
    genome = learner.named_meta("gradient:0.2")
    key = jax.random.PRNGKey(0)
    for outer in (GradientOuterLoop(batch_size=2),
                  EvolutionOuterLoop(strategy="CMA_ES", population_size=4, batch_size=2,
                                     fitness="error")):
        state = outer.init(learner, sampler, key, genome)
        for a, b in zip(jax.tree.leaves(outer.meta_params(state)), jax.tree.leaves(genome),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    evo = EvolutionOuterLoop(strategy="CMA_ES", population_size=4, fitness="error")
    np.testing.assert_allclose(evo.fitness_of({"accuracy": jnp.array([0.25, 1.0])}), [0.75, 0.0])
    assert EvolutionOuterLoop(fitness="-accuracy").fitness_of(
        {"accuracy": jnp.array([0.5])})[0] == -0.5
    with pytest.raises(ValueError, match="reports accuracy, loss, error"):
        EvolutionOuterLoop(fitness="auc").init(learner, sampler, key)
    with pytest.raises(ValueError, match="do not fit HebbianLearner"):
        GradientOuterLoop().init(learner, sampler, key, {**genome, "nu": jnp.zeros((3, 3))})


def test_meta_losses():
    """mse is the paper code's; balanced_mse gives a constant output no edge over chance;
    cross_entropy is the outputs' softmax cross-entropy."""
    y = jnp.array([0, 1, 2, 3])
    const = -jnp.ones((4, 4))  # the off value everywhere
    mse, bal = (HebbianLearner(ways=4, meta_loss=m) for m in ("mse", "balanced_mse"))
    np.testing.assert_allclose(mse.score(const, y)["loss"], 1.0)  # 4 / 4 units
    np.testing.assert_allclose(bal.score(const, y)["loss"], 2.0)  # half of (1 - (-1))^2
    np.testing.assert_allclose(bal.score(jnp.zeros((4, 4)), y)["loss"], 1.0)
    out = jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    ce = HebbianLearner(ways=4, meta_loss="cross_entropy").score(out, y)
    want = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(out)), np.asarray(y)[:, None],
                                       axis=1))
    np.testing.assert_allclose(ce["loss"], want, rtol=1e-6)
    np.testing.assert_allclose(ce["accuracy"], np.mean(np.argmax(out, -1) == y))
    with pytest.raises(ValueError, match="meta_loss"):
        HebbianLearner(meta_loss="hinge")
    with pytest.raises(ValueError, match="plain network uses 'tanh'"):
        GradientBaseline(hidden_activation="tanh_with_grad")


@pytest.mark.slow
def test_hebbian_2d_trains_and_reports_from_the_command_line(tmp_path):
    """A tiny hebbian_2d run: the report has the rule's, SGD's and Adam's accuracies at T and
    4T with tuned rates, and the accuracy-versus-step figure."""
    import json

    from metalearn.cli import main

    run = tmp_path / "h2d"
    sets = ["steps=3", "eval_every=0", "test_episodes=20", "report_episodes=20",
            "tune_episodes=10", "baseline_lrs=0.1,1", "learner.hidden=6", "learner.inner_steps=2",
            "init_from=gradient:0.1"]
    assert main(["train", "hebbian_2d", "--run-dir", str(run), "--no-progress",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["report_steps"] == [2, 8]
    for name in ("rule", "sgd", "adam"):
        acc = summary[f"{name}_accuracy"]
        assert set(acc) == {"2", "8"} and all(0 <= v["mean"] <= 1 for v in acc.values())
        assert len(summary["curves"][name]["mean"]) == 9
    assert summary["tuning"]["sgd"]["learning_rate"] in (0.1, 1.0)
    assert (run / "plots" / "accuracy_vs_steps.png").stat().st_size > 0

    # `metalearn evaluate` scores the tuned baselines beside the rule, on the test episodes
    import jax
    import jax.numpy as jnp

    from metalearn.evaluation import evaluate
    from metalearn.experiments import _hebbian
    from metalearn.reload import evaluate_run, load_run
    from metalearn.seeds import TEST_SEED

    res = evaluate_run(run)
    loaded = load_run(run)
    names = {f"{o} (lr {summary['tuning'][o]['learning_rate']:g}, tuned)": o
             for o in ("sgd", "adam")}
    assert set(res["baselines"]) == set(names)
    for name, opt in names.items():
        lr = summary["tuning"][opt]["learning_rate"]
        alone = evaluate(_hebbian.baseline(loaded.learner, opt),
                         {"learning_rate": jnp.float32(lr)}, loaded.splits["test"],
                         jax.random.PRNGKey(TEST_SEED), 20, loaded.config.eval_batch_size)
        assert res["baselines"][name]["accuracy"] == pytest.approx(alone["accuracy"])
    assert "baselines" not in evaluate_run(run, baselines=False)


def test_evaluate_baselines_are_the_rules_network_at_the_tuned_rates(tmp_path, monkeypatch):
    """The baselines `metalearn evaluate` scores beside a rule: SGD and Adam training the
    rule's network at the rates the tuning chose, then the `report_runs` learners."""
    from metalearn.experiments import _hebbian, hebbian_2d
    from metalearn.runs import Run

    config = hebbian_2d.get_config()
    config.baseline_lrs = "0.1,1"
    exp = hebbian_2d.build(config)
    monkeypatch.setattr(_hebbian, "tune", lambda learner, opt, *a, **k: (
        {"sgd": 1.0, "adam": 0.1}[opt], {0.1: 0.5, 1.0: 0.6}))
    out = _hebbian.baselines(exp, Run(tmp_path), config)
    assert list(out) == ["sgd (lr 1, tuned)", "adam (lr 0.1, tuned)"]
    for name, (learner, meta) in out.items():
        assert learner.optimizer == name.split()[0]
        assert float(meta["learning_rate"]) == pytest.approx(
            {"sgd": 1.0, "adam": 0.1}[learner.optimizer])
        for f in ("hidden", "ways", "inner_steps"):
            assert getattr(learner, f) == getattr(exp.learner, f)


def test_baseline_tuning_is_kept_in_the_run_and_redone_when_its_settings_change(tmp_path,
                                                                              monkeypatch):
    """The report's SGD/Adam tuning depends on the network, the tasks and the rates tried, not
    on the trained rule: a report made again reads baseline_tuning.json back."""
    from metalearn.experiments import _hebbian, hebbian_2d
    from metalearn.runs import Run

    exp = hebbian_2d.build(hebbian_2d.get_config())
    calls = []

    def fake_tune(learner, optimizer, sampler, lrs, episodes, batch, progress=False):
        calls.append((optimizer, tuple(lrs)))
        return lrs[-1], {lr: 0.5 + lr / 100 for lr in lrs}

    monkeypatch.setattr(_hebbian, "tune", fake_tune)
    run = Run(tmp_path)
    first = _hebbian.tuned_rates(exp.learner, exp.train, [0.1, 1.0], 10, 5, run)
    assert calls == [("sgd", (0.1, 1.0)), ("adam", (0.1, 1.0))]
    assert first["sgd"]["learning_rate"] == 1.0 and (tmp_path / _hebbian.TUNING_FILE).exists()
    assert _hebbian.tuned_rates(exp.learner, exp.train, [0.1, 1.0], 10, 5, run) == first
    assert len(calls) == 2  # read back, not tuned again
    _hebbian.tuned_rates(exp.learner, exp.train, [0.1, 3.0], 10, 5, run)
    assert calls[-1] == ("adam", (0.1, 3.0))
    assert run.read_json(_hebbian.TUNING_FILE)["sgd"]["learning_rate"] == 3.0

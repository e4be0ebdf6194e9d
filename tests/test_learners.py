"""One conformance suite that every inner learner passes (as evosax tests every strategy).

A learner joins by one line in `LEARNERS`: a name, the learner, the sampler it learns from, and
which symmetries the method claims. Every entry is checked for: init on the sampler's example,
`adapt`/`predict` under `jit` (equal to eager), `vmap` over a batch of episodes equal to a Python
loop, finite meta-gradients, `vmap` over a population of meta-parameters (the evolution loop's
path) equal to a loop, same seed same numbers through both outer loops, and the claimed
permutation behaviour of the support set.

Registered: ProtoNet (on the CNN, and on an MLP embedding); the Continual HyperTransformer and its
Constant ProtoNet baseline (on sequences of two tasks); the learned optimizers MLPLOpt and
AdafacLOpt; MAML (second order, and first order with Meta-SGD step sizes) on the CNN, the MLP and
the linear model (ANIL, the head-only option, has its own tests in test_maml.py) and Meta-SGD on the
learned rules' network; LSA (linear and softmax); the multi-state Hebbian network (a random genome)
and its Adam baseline; the explicit in-context baselines of `metalearn.learners.gd` (the
`LinearInContext` learners GradientDescent and LeastSquares).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import InnerLearner, Support, TaskSampler, batch_loss
from metalearn.learners.continual import ConstPN, ContinualHyperTransformer
from metalearn.learners.gd import GradientDescent, LeastSquares
from metalearn.learners.hebbian import HebbianLearner
from metalearn.learners.hypertransformer import HyperTransformer
from metalearn.learners.lopt import AdafacLOpt, MLPLOpt
from metalearn.learners.lsa import LSA
from metalearn.learners.maml import MAML, MAMLNetwork
from metalearn.learners.network import GradientBaseline, Network
from metalearn.learners.protonet import ProtoNet
from metalearn.nn import CNN, MLP, Linear
from metalearn.outer.evolution import EvolutionOuterLoop
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks.continual import ContinualSampler
from metalearn.tasks.fewshot import FewShotSampler
from metalearn.tasks.regression import LinearRegression
from metalearn.tasks.testing import synthetic_dataset

WAYS = 3


@cache
def images() -> TaskSampler:
    """3-way 2-shot 2-query episodes of 8x8 synthetic images."""
    return FewShotSampler(synthetic_dataset(classes=12, examples=6, size=8), WAYS, 2, 2)


@cache
def sequences() -> TaskSampler:
    """Two 3-way 2-shot 2-query tasks in sequence (continual learners), 8x8 images."""
    return ContinualSampler(images(), tasks=2)


@cache
def regression() -> TaskSampler:
    """Linear regression, d = 3, 6 context pairs, 4 queries."""
    return LinearRegression(dim=3, num_context=6, num_queries=4, input_range=1.0)


def cnn(out_dim: int = WAYS) -> CNN:
    """A 2-block, 4-channel CNN: 8x8 -> 2x2 maps (enough to test, cheap to compile)."""
    return CNN(channels=4, num_blocks=2, out_dim=out_dim)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A learner in the suite and what its method claims."""

    name: str
    learner: InnerLearner
    sampler: Callable[[], TaskSampler]
    order_invariant: bool = True  # reordering the support set changes no prediction
    label_equivariant: bool = False  # relabelling the classes permutes the logits' columns
    trainable: bool = True  # has meta-parameters for the outer loops to train

    def __repr__(self) -> str:
        return self.name


LEARNERS = [
    Entry("protonet", ProtoNet(channels=4, num_blocks=2), images, label_equivariant=True),
    Entry("protonet_mlp", ProtoNet(embedding=MLP((8,), out_dim=4)), images,
          label_equivariant=True),
    Entry("maml_cnn", MAML(cnn(), inner_steps=2, inner_lr=0.1), images),
    Entry("fomaml_cnn_metasgd", MAML(cnn(), inner_steps=2, first_order=True,
                                     lr_mode="per_param"), images),
    # one conv block: a generator per layer is compiled, and the suite's time is compile time
    Entry("hypertransformer", HyperTransformer(ways=WAYS, channels=4, num_blocks=1, embed_dim=8,
                                               shared_features=4, local_features=4,
                                               num_layers=1), images),
    Entry("ht_logits_only", HyperTransformer(ways=WAYS, channels=4, num_blocks=1,
                                             trained_blocks=1, embed_dim=8, shared_features=0,
                                             local_features=4, num_layers=1), images),
    # the order of tasks is what a continual learner learns from: not order invariant
    Entry("continual_ht", ContinualHyperTransformer(ways=WAYS, tasks=2, channels=4, num_blocks=1,
                                                    embed_dim=8, shared_features=4,
                                                    local_features=4, num_layers=1),
          sequences, order_invariant=False),
    Entry("const_pn", ConstPN(ways=WAYS, tasks=2, channels=4, num_blocks=2), sequences,
          order_invariant=False),
    Entry("maml_linear", MAML(Linear(), inner_steps=3, inner_lr=0.05, lr_mode="scalar"),
          regression),
    Entry("maml_mlp_metasgd", MAML(MLP((8,)), inner_steps=2, lr_mode="per_param"), regression),
    Entry("lsa", LSA(), regression),
    Entry("lsa_softmax", LSA(softmax=True, num_heads=2), regression),
    Entry("hebbian", HebbianLearner(ways=WAYS, hidden=(6,), inner_steps=2), images),
    Entry("hebbian_adam_baseline", GradientBaseline(ways=WAYS, hidden=(6,), inner_steps=2,
                                                    optimizer="adam"), images, trainable=False),
    Entry("mlp_lopt", MLPLOpt(ways=WAYS, hidden=(6,), inner_steps=2), images),
    Entry("adafac_lopt", AdafacLOpt(ways=WAYS, hidden=(6,), inner_steps=2, max_offset=50),
          images),
    Entry("metasgd_network", MAMLNetwork(ways=WAYS, hidden=(6,), inner_steps=2,
                                         lr_mode="per_param"), images),
    Entry("gd", GradientDescent(steps=2), regression),
    Entry("least_squares", LeastSquares(ridge=0.1), regression, trainable=False),
]
TRAINABLE = [e for e in LEARNERS if e.trainable]
# To keep the default suite under 10 minutes, some checks run with `pytest -m slow` only. The
# second MAML-CNN entry adds no path the first lacks: all its checks are slow. So are the
# Hebbian entries' (about 1 s of compiling per random draw on XLA:CPU; tests/test_hebbian.py
# checks the rule by default), the continual learners' (tests/test_continual.py checks their
# unroll under jit against a reference by default) and the learned optimizers' (their
# update, guard and offsets are checked by default in tests/test_lopt.py, and Meta-SGD on
# their network in tests/test_maml.py). The outer-loop
# and population checks compile both loops for 5-30 s each: they run by default for one
# learner of each kind of model (ProtoNet on an MLP, GD, MAML on the linear model).
SLOW_ALL = {"fomaml_cnn_metasgd", "hebbian", "hebbian_adam_baseline", "const_pn", "mlp_lopt",
            "adafac_lopt", "continual_ht", "metasgd_network"}
SLOW_OUTER = {*SLOW_ALL, "ht_logits_only", "hypertransformer", "continual_ht", "const_pn",
              "maml_cnn", "protonet", "lsa", "lsa_softmax", "maml_mlp_metasgd", "hebbian",
              "adafac_lopt", "metasgd_network"}


def with_slow(entries: list[Entry], slow: set[str]) -> list:
    """The entries as pytest parameters, those named in `slow` marked slow."""
    return [pytest.param(e, marks=pytest.mark.slow) if e.name in slow else e for e in entries]
KEY = jax.random.PRNGKey(0)


def _close(a, b, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@cache
def setup(entry: Entry):
    """(learner, meta, one episode, a batch of 3 episodes, jitted predictions) of an entry."""
    learner, sampler = entry.learner, entry.sampler()
    meta = learner.init(jax.random.PRNGKey(1), sampler.example())
    batch = sampler.sample_batch(jax.random.PRNGKey(2), 3)
    predict = jax.jit(lambda m, s, q: learner.predict(m, learner.adapt(m, s, KEY), q))
    return learner, meta, sampler.sample(jax.random.PRNGKey(3)), batch, predict


@pytest.mark.parametrize("entry", with_slow(LEARNERS, SLOW_ALL), ids=repr)
def test_init_on_the_samplers_example(entry):
    learner, meta, ep, _, _ = setup(entry)
    again = learner.init(jax.random.PRNGKey(1), entry.sampler().example())
    assert jax.tree.structure(again) == jax.tree.structure(meta)
    for a, b in zip(jax.tree.leaves(meta), jax.tree.leaves(again), strict=True):
        assert bool(jnp.all(jnp.isfinite(a))) and np.array_equal(a, b)  # same seed, same init


@pytest.mark.parametrize("entry", with_slow(LEARNERS, SLOW_ALL), ids=repr)
def test_adapt_and_predict_under_jit_equal_eager(entry):
    learner, meta, ep, _, predict = setup(entry)
    jitted = predict(meta, ep.support(), ep.query_x)
    eager = learner.predict(meta, learner.adapt(meta, ep.support(), KEY), ep.query_x)
    if ep.is_classification:
        assert jitted.ndim == 2 and jitted.shape[0] == ep.query_x.shape[0]
        assert jitted.shape[1] >= WAYS
    else:
        assert jitted.shape == ep.query_y.shape
    _close(jitted, eager, rtol=1e-4, atol=1e-4)
    loss, metrics = jax.jit(learner.loss)(meta, ep, KEY)
    assert np.isfinite(loss) and metrics["loss"] == loss
    assert ("accuracy" in metrics) == ep.is_classification


@pytest.mark.parametrize("entry", with_slow(LEARNERS, SLOW_ALL), ids=repr)
def test_vmap_over_episodes_equals_a_loop(entry):
    learner, meta, _, batch, predict = setup(entry)
    vmapped = jax.jit(jax.vmap(lambda s, q: predict(meta, s, q)))(batch.support(), batch.query_x)
    for i in range(3):
        ep = jax.tree.map(lambda a, i=i: a[i], batch)
        _close(vmapped[i], predict(meta, ep.support(), ep.query_x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("entry", with_slow(TRAINABLE, SLOW_ALL), ids=repr)
def test_meta_gradients_are_finite(entry):
    learner, meta, _, batch, _ = setup(entry)
    grads = jax.jit(jax.grad(lambda m: batch_loss(learner, m, batch, KEY)[0]))(meta)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


@pytest.mark.parametrize("entry", with_slow(TRAINABLE, SLOW_OUTER), ids=repr)
def test_vmap_over_a_population_equals_a_loop(entry):
    learner, meta, _, batch, _ = setup(entry)
    leaves, tree = jax.tree.flatten(meta)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    pop = tree.unflatten([p + 0.01 * jax.random.normal(k, (4, *jnp.shape(p)))
                          for p, k in zip(leaves, keys, strict=True)])
    fitness = jax.jit(lambda m: batch_loss(learner, m, batch, KEY)[0])
    together = jax.jit(jax.vmap(lambda m: batch_loss(learner, m, batch, KEY)[0]))(pop)
    alone = [fitness(jax.tree.map(lambda a, i=i: a[i], pop)) for i in range(4)]
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert len(set(np.asarray(alone).tolist())) > 1  # the members differ


@pytest.mark.parametrize("entry", with_slow(TRAINABLE, SLOW_OUTER), ids=repr)
def test_both_outer_loops_same_seed_same_numbers(entry):
    loops = [GradientOuterLoop(batch_size=2),
             EvolutionOuterLoop(strategy="Sep_CMA_ES", population_size=4, batch_size=2,
                                std_init=0.01)]
    for outer in loops:
        steps = outer.compiled_steps(entry.learner, entry.sampler(), None)
        (a, ma), (b, mb) = (steps(outer.init(entry.learner, entry.sampler(), KEY), 2)
                            for _ in range(2))
        assert np.all(np.isfinite(ma["loss"])) and np.array_equal(ma["loss"], mb["loss"])
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            assert np.array_equal(x, y)
        start = outer.meta_params(outer.init(entry.learner, entry.sampler(), KEY))
        assert any(not np.array_equal(x, y) for x, y in zip(
            jax.tree.leaves(outer.meta_params(a)), jax.tree.leaves(start), strict=True))


def _permuted(support: Support, perm: np.ndarray) -> Support:
    return Support(support.x[perm], support.y[perm], support.unlabeled_x)


@pytest.mark.parametrize("entry", with_slow([e for e in LEARNERS if e.order_invariant],
                                           SLOW_ALL), ids=repr)
def test_reordering_the_support_set_changes_nothing(entry):
    _, meta, ep, _, predict = setup(entry)
    perm = np.random.default_rng(0).permutation(ep.support_x.shape[0])
    _close(predict(meta, _permuted(ep.support(), perm), ep.query_x),
           predict(meta, ep.support(), ep.query_x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("entry", [e for e in LEARNERS if e.label_equivariant], ids=repr)
def test_relabelling_the_classes_permutes_only_the_logits(entry):
    _, meta, ep, _, predict = setup(entry)
    pi = np.array([2, 0, 1])
    relabelled = Support(ep.support_x, jnp.asarray(pi)[ep.support_y], ep.unlabeled_x)
    base = np.asarray(predict(meta, ep.support(), ep.query_x))[:, :WAYS]
    moved = np.asarray(predict(meta, relabelled, ep.query_x))[:, :WAYS]
    np.testing.assert_allclose(moved[:, pi], base, rtol=1e-5, atol=1e-4)


def test_every_learner_class_is_registered():
    """A new learner module joins the suite: each InnerLearner subclass defined under
    metalearn.learners appears in LEARNERS (directly or through a registered subclass)."""
    import importlib
    import inspect
    import pkgutil

    import metalearn.learners as pkg

    registered = {type(e.learner) for e in LEARNERS}
    # abstract bases join through every concrete learner built on them
    assert {HebbianLearner, GradientBaseline} <= registered and all(
        issubclass(c, Network) for c in (HebbianLearner, GradientBaseline))
    for m in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"metalearn.learners.{m.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, InnerLearner) and cls.__module__ == mod.__name__:
                assert any(issubclass(r, cls) for r in registered), \
                    f"{cls.__name__} ({mod.__name__}) is not in tests/test_learners.py LEARNERS"


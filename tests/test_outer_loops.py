"""One conformance suite that every built-in outer loop passes (as tests/test_learners.py does
for the learners and tests/test_samplers.py for the samplers).

A loop joins by one line in `OUTER_LOOPS` (a test fails until every registered built-in kind
has one). Every entry is checked for: `step` a pure function of the state (the same state
gives the same result); `compiled_steps` (several steps in one `lax.scan`) equal to the steps
one by one, which exact resume and `steps_per_call` rely on; `meta_params` shaped like the
learner's meta-parameters; and its config (`loop_config`) building the same loop again.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metalearn.outer.evolution import EvolutionOuterLoop
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.outer.registry import BUILTIN, build_outer, loop_config, outer_loops
from metalearn.outer.truncated import TruncatedOuterLoop
from metalearn.tasks.regression import LinearRegression
from tests.helpers import InnerGD


def _sampler() -> LinearRegression:
    return LinearRegression(dim=3, num_context=6, num_queries=4)


def _learner() -> InnerGD:
    """Cheap to compile, differentiable and unrollable in pieces: every loop can train it."""
    return InnerGD(horizon=4)


OUTER_LOOPS = {
    "gradient": lambda: GradientOuterLoop(learning_rate=1e-2, batch_size=2),
    "evolution": lambda: EvolutionOuterLoop(strategy="Open_ES", population_size=4,
                                            batch_size=2, std_init=0.05),
    "truncated": lambda: TruncatedOuterLoop(truncation=2, batch_size=2),
}


@pytest.fixture(params=sorted(OUTER_LOOPS))
def loop(request):
    return OUTER_LOOPS[request.param]()


def _equal(a, b, **tol) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol),
                 a, b)


def test_every_built_in_loop_joins_the_suite():
    built_in = {k for k, cls in outer_loops().items() if cls.__module__ in BUILTIN}
    missing = built_in - set(OUTER_LOOPS)
    assert built_in == set(OUTER_LOOPS), f"add a line to OUTER_LOOPS for {missing}"


def test_step_is_pure_and_a_scan_of_steps_equals_the_steps(loop):
    learner, sampler = _learner(), _sampler()
    state = loop.init(learner, sampler, jax.random.PRNGKey(0))
    step = jax.jit(lambda s: loop.step(learner, sampler, s))
    s1, m1 = step(state)
    s1_again, m1_again = step(state)
    _equal((s1, m1), (s1_again, m1_again), rtol=0, atol=0)
    s3 = step(step(s1)[0])[0]
    fused, metrics = loop.compiled_steps(learner, sampler)(jax.tree.map(np.array, state), 3)
    _equal(fused, s3, rtol=1e-5, atol=1e-6)
    assert int(fused.step) == 3
    assert all(np.shape(v) == (3,) for v in jax.tree.leaves(metrics))  # one value a step
    assert np.isfinite(np.asarray(metrics["loss"])).all()


def test_meta_params_are_shaped_like_the_learners(loop):
    learner, sampler = _learner(), _sampler()
    state = loop.init(learner, sampler, jax.random.PRNGKey(0))
    want = jax.tree.map(np.shape, learner.init(jax.random.PRNGKey(0), sampler.example()))
    assert jax.tree.map(np.shape, loop.meta_params(state)) == want


def test_the_config_builds_the_same_loop(loop):
    assert build_outer(loop_config(loop)) == loop

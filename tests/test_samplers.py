"""One conformance suite that every task sampler passes (as tests/test_learners.py does for the
learners).

A sampler joins by one line in `SAMPLERS`. Every entry is checked for: `example()` a valid
episode; `sample` a pure function of its key (same key, same episode; another key, another);
`sample` under `jit` equal to eager; `sample_batch` equal to a loop of `sample` over the split
keys (what the outer loops' `vmap` relies on); `describe()` JSON; and, for a sampler that is a
pytree (its data as leaves, so a compiled program takes it as an argument), the flatten /
unflatten round trip giving the same episodes.
"""

from __future__ import annotations

import json
from functools import cache

import jax
import numpy as np
import pytest

from metalearn.core import TaskSampler, check_episode
from metalearn.tasks.continual import ContinualSampler
from metalearn.tasks.fewshot import FewShotSampler
from metalearn.tasks.functions2d import Functions2D
from metalearn.tasks.regression import (
    LinearRegression,
    Sinusoid,
    SparseLinearRegression,
    TaskPool,
    TeacherNetwork,
)
from metalearn.tasks.testing import synthetic_dataset


@cache
def _images():
    return synthetic_dataset(classes=12, examples=8, size=6)


SAMPLERS = {
    "fewshot": lambda: FewShotSampler(_images(), 3, 2, 2),
    "fewshot_rotations_unlabeled": lambda: FewShotSampler(_images(), 5, 1, 2, unlabeled=1,
                                                          rotations=True),
    "continual": lambda: ContinualSampler(FewShotSampler(_images(), 3, 2, 2), tasks=3),
    "linear_regression": lambda: LinearRegression(dim=3, num_context=5, num_queries=2),
    "sparse_linear_regression": lambda: SparseLinearRegression(dim=4, num_context=5),
    "teacher_network": lambda: TeacherNetwork(num_context=5),
    "sinusoid": lambda: Sinusoid(num_context=5),
    "task_pool": lambda: TaskPool(LinearRegression(dim=3, num_context=5), num_tasks=4),
    "functions2d": lambda: Functions2D(num_support=8, num_queries=8),
}


def _equal(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(params=sorted(SAMPLERS))
def sampler(request) -> TaskSampler:
    return SAMPLERS[request.param]()


def test_example_is_a_valid_episode(sampler):
    check_episode(sampler.example(), name=f"{type(sampler).__name__}.example()")


def test_sample_is_a_pure_function_of_its_key(sampler):
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    _equal(sampler.sample(k1), sampler.sample(k1))
    a, b = sampler.sample(k1), sampler.sample(k2)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_jit_equals_eager_and_a_batch_equals_a_loop(sampler):
    key = jax.random.PRNGKey(3)
    one = jax.jit(sampler.sample)
    close = lambda a, b: jax.tree.map(  # noqa: E731
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6,
                                                atol=1e-6), a, b)
    close(one(key), sampler.sample(key))
    batch = jax.jit(lambda k: sampler.sample_batch(k, 3))(key)
    for i, k in enumerate(jax.random.split(key, 3)):
        close(jax.tree.map(lambda x, i=i: np.asarray(x)[i], batch), one(k))


def test_describe_is_json(sampler):
    d = sampler.describe()
    assert json.loads(json.dumps(d)) == d and "sampler" in d


def test_a_pytree_sampler_round_trips(sampler):
    leaves, tree = jax.tree.flatten(sampler)
    if leaves == [sampler]:
        pytest.skip(f"{type(sampler).__name__} is not a pytree")
    again = jax.tree.unflatten(tree, leaves)
    key = jax.random.PRNGKey(4)
    _equal(again.sample(key), sampler.sample(key))
    # as an argument of a compiled function (its data not baked into the program)
    _equal(jax.jit(lambda s, k: s.sample(k))(sampler, key), sampler.sample(key))

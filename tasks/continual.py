"""Continual few-shot episodes: T tasks in sequence, each N-way K-shot with Q queries per class.

One `Episode` holds the whole sequence: the support set is T consecutive chunks of N*K images
(task 0 first), the query set T chunks of N*Q. Labels name classes over the sequence: the
sequence draws a pool of `pool` distinct classes, and an image's label is its class's index in
the pool (0..pool-1). With `pool = tasks * ways` (the default) every task brings N new classes;
a smaller pool lets classes come back (each task draws its N classes from the pool at random);
`pool = ways` gives every task the same classes (learning one task from T mini-batches of its
support). Images are drawn per task, distinct within the task; a class that comes back may
reuse images it showed before.

Learners read the task structure from positions (`ContinualHyperTransformer(tasks=T, ways=N)`).
The images, normalisation and rotations are the base `FewShotSampler`'s; its per-class random
rotation, when set, is drawn once per pool class, so a class keeps its rotation across tasks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from metalearn.core import Array, Episode, TaskSampler
from metalearn.tasks.fewshot import (
    FewShotSampler,
    ImageRefs,
    _jit_sample,
    _random_subset,
    random_permutation,
)


@jax.tree_util.register_pytree_node_class
class ContinualSampler(TaskSampler):
    """`tasks` few-shot tasks of `ways` classes in sequence, from the images of `base`
    (`ways`, `shots`, `queries` default to the base sampler's)."""

    def __init__(self, base: FewShotSampler, tasks: int, ways: int | None = None,
                 shots: int | None = None, queries: int | None = None, pool: int = 0):
        if not isinstance(base, FewShotSampler):
            raise TypeError(f"ContinualSampler draws from a FewShotSampler's images, got "
                            f"{type(base).__name__}")
        ways = base.ways if ways is None else ways
        shots = base.shots if shots is None else shots
        queries = base.queries if queries is None else queries
        for f, v in (("tasks", tasks), ("ways", ways), ("shots", shots), ("queries", queries)):
            if int(v) != v or v < 1:
                raise ValueError(f"ContinualSampler: {f} must be an integer >= 1, got {v!r}")
        pool = int(pool) or tasks * ways
        if not ways <= pool <= tasks * ways:
            raise ValueError(f"ContinualSampler: pool={pool} classes must lie between ways="
                             f"{ways} (every task the same classes) and tasks x ways = "
                             f"{tasks * ways} (every task new classes)")
        if base.within_group or base.augment is not None or base.unlabeled:
            raise ValueError("ContinualSampler: the base sampler's within_group, augment and "
                             "unlabeled options are not supported; pass a plain FewShotSampler")
        self.tasks, self.pool = int(tasks), pool
        # the base holds the images and checks that its classes have enough of them
        self.base = base.replace(ways=ways, shots=shots, queries=queries)
        if pool > self.base.num_classes:
            raise ValueError(f"ContinualSampler: {tasks} tasks x {ways} ways need a pool of "
                             f"{pool} classes but the dataset has {self.base.num_classes}; "
                             "lower tasks, ways or pool")

    def tree_flatten(self) -> tuple[tuple[FewShotSampler], tuple]:
        """Leaves: the base sampler (its device images); aux: the sequence settings."""
        return (self.base,), (self.tasks, self.pool)

    @classmethod
    def tree_unflatten(cls, aux: tuple, leaves: tuple) -> ContinualSampler:
        """Rebuild without re-validating."""
        obj = cls.__new__(cls)
        obj.tasks, obj.pool = aux
        (obj.base,) = leaves
        return obj

    @property
    def ways(self) -> int:
        """N: classes per task."""
        return self.base.ways

    @property
    def shots(self) -> int:
        """K: support images per class and task."""
        return self.base.shots

    @property
    def queries(self) -> int:
        """Q: query images per class and task."""
        return self.base.queries

    @property
    def dataset(self) -> Any:
        """The base sampler's dataset."""
        return self.base.dataset

    def replace(self, dataset: Any = None, **changes: Any) -> ContinualSampler:
        """A copy with other `tasks`, `pool`, `ways`, `shots` or `queries` (or dataset); a
        new `tasks` with `pool` unset keeps the pool's kind (all new classes, or the same)."""
        names = ("tasks", "pool", "ways", "shots", "queries")
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise TypeError(f"ContinualSampler.replace: unknown settings {unknown}; use {names}")
        tasks = changes.get("tasks", self.tasks)
        ways = changes.get("ways", self.ways)
        pool = changes.get("pool")
        if pool is None:
            pool = ways if self.pool == self.ways else (
                tasks * ways if self.pool == self.tasks * self.ways else self.pool)
        base = self.base if dataset is None else self.base.replace(dataset)
        return ContinualSampler(base, tasks, ways, changes.get("shots", self.shots),
                                changes.get("queries", self.queries), pool)

    def setting_tag(self) -> str:
        """The sequence setting in a file name: `5tasks_5way_1shot_15query_25pool`."""
        return (f"{self.tasks}tasks_{self.ways}way_{self.shots}shot_{self.queries}query_"
                f"{self.pool}pool")

    def draw(self, key: Array) -> Episode:
        """`sample(key)`, compiled (the images are an argument of the program)."""
        return _jit_sample(self, key)

    def batch_sampler(self, batch_size: int) -> Callable[[Array], Episode]:
        """`key -> sample_batch(key, batch_size)`: `draw` (compiled, the images an argument) for
        each sequence's key, stacked; the same episodes, from the one small program that
        `example` compiles rather than a batched one per split and sequence length."""
        def sample(key: Array) -> Episode:
            draws = [self.draw(k) for k in jax.random.split(key, batch_size)]
            return jax.tree.map(lambda *a: jnp.stack(a), *draws)
        return sample

    def describe(self) -> dict:
        """JSON-able settings and the base sampler's description."""
        return {"sampler": type(self).__name__, "tasks": self.tasks, "ways": self.ways,
                "shots": self.shots, "queries": self.queries, "pool": self.pool,
                "base": self.base.describe()}

    def sample_refs(self, key: Array) -> tuple[ImageRefs, ImageRefs, Array]:
        """Which images make up the sequence for `key`: support and query refs ([T*N*K] and
        [T*N*Q], task-major) and the pool's dataset classes [pool]."""
        b, T, N, K, Q = self.base, self.tasks, self.ways, self.shots, self.queries
        k_pool, k_task, k_rot, k_ex, k_s, k_q = jax.random.split(key, 6)
        n_base = b.dataset.num_classes
        chosen = _random_subset(k_pool, self.pool, jnp.ones(b.num_classes, bool))
        base_cls, rot = chosen % n_base, chosen // n_base
        if b.random_rotation:
            rot = jax.random.randint(k_rot, (self.pool,), 0, 4)
        if self.pool == T * N:
            classes = jnp.arange(T * N, dtype=jnp.int32).reshape(T, N)
        else:
            classes = jax.vmap(lambda k: random_permutation(k, self.pool)[:N])(
                jax.random.split(k_task, T))
        m = b.dataset.images.shape[1]
        valid = jnp.arange(m) < b._counts[base_cls[classes]][..., None]  # [T, N, m]
        ex = _random_subset(k_ex, K + Q, valid)  # [T, N, K + Q]

        def refs(k: Array, lo: int, n: int) -> ImageRefs:
            def one(kt: Array, t: Array) -> ImageRefs:
                pos = random_permutation(kt, N * n) if b.shuffle else jnp.arange(N * n)
                c, j = pos // n, pos % n
                label = classes[t, c]
                return ImageRefs(base_cls[label], ex[t, c, lo + j], rot[label], label)
            r = jax.vmap(one)(jax.random.split(k, T), jnp.arange(T))
            return jax.tree.map(lambda a: a.reshape(-1), r)

        return refs(k_s, 0, K), refs(k_q, K, Q), chosen

    def sample(self, key: Array) -> Episode:
        """One sequence: support [T*N*K, H, W, C], query [T*N*Q, ...], labels in [0, pool)."""
        s, q, _ = self.sample_refs(key)
        shape = self.base.dataset.image_shape
        xs, xq = (self.base._flat_images(r).reshape(-1, *shape) for r in (s, q))
        return Episode(xs, s.label.astype(jnp.int32), xq, q.label.astype(jnp.int32))

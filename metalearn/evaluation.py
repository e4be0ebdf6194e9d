"""Evaluation of a learner on sampled episodes: mean query metrics with 95% confidence intervals."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import Array, Episode, InnerLearner, MetaParams, TaskSampler


def summarize(per_episode: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and 95% normal-approximation confidence half-width (1.96 s / sqrt(n)) per metric."""
    out: dict[str, float] = {}
    for k, v in per_episode.items():
        v = np.asarray(v, dtype=np.float64)
        n = v.size
        out[k] = float(v.mean())
        out[f"{k}_ci95"] = float(1.96 * v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    if per_episode:
        out["episodes"] = int(next(iter(per_episode.values())).size)
    return out


def _episode_metrics_fn(learner: InnerLearner):
    def f(meta: MetaParams, episodes: Episode, key: Array) -> dict:
        keys = jax.random.split(key, jax.tree.leaves(episodes)[0].shape[0])
        _, m = jax.vmap(learner.loss, in_axes=(None, 0, 0))(meta, episodes, keys)
        return m

    return jax.jit(f)


_CACHE: dict[Any, Any] = {}


def episode_metrics(learner: InnerLearner, meta: MetaParams, episodes: Episode,
                    key: Array) -> dict[str, np.ndarray]:
    """Per-episode metrics of a batch of episodes (leading axis), as NumPy arrays."""
    try:  # learners are frozen dataclasses: equal configs share one compiled function
        fn = _CACHE.get(learner) or _CACHE.setdefault(learner, _episode_metrics_fn(learner))
    except TypeError:  # unhashable learner: compile per call site
        fn = _episode_metrics_fn(learner)
    return {k: np.asarray(v) for k, v in fn(meta, episodes, key).items()}


def batch_sampler(sampler: TaskSampler, batch_size: int):
    """A compiled `key -> batch of episodes`, reused across calls (no recompile per evaluation).

    Uses the sampler's own `batch_sampler` when it has one (few-shot image samplers pass their
    data as an argument instead of baking it into the program).
    """
    if hasattr(sampler, "batch_sampler"):
        return sampler.batch_sampler(batch_size)
    try:
        fn = _CACHE.get((sampler, batch_size))
    except TypeError:  # unhashable sampler
        return jax.jit(lambda key: sampler.sample_batch(key, batch_size))
    if fn is None:
        fn = _CACHE[(sampler, batch_size)] = jax.jit(
            lambda key: sampler.sample_batch(key, batch_size))
    return fn


def evaluate(learner: InnerLearner, meta: MetaParams, sampler: TaskSampler, key: Array,
             episodes: int = 1000, batch_size: int = 100) -> dict[str, float]:
    """Mean query loss/accuracy over `episodes` sampled episodes, with 95% CIs."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    batch_size = min(batch_size, episodes)
    sample = batch_sampler(sampler, batch_size)
    chunks: list[dict[str, np.ndarray]] = []
    done = 0
    i = 0
    while done < episodes:
        n = min(batch_size, episodes - done)
        k_s, k_l = jax.random.split(jax.random.fold_in(key, i))
        eps = sample(k_s)
        m = episode_metrics(learner, meta, eps, k_l)
        chunks.append({k: v[:n] for k, v in m.items()})
        done += n
        i += 1
    per = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return summarize(per)


def evaluate_episodes(learner: InnerLearner, meta: MetaParams, episodes: Episode, key: Array,
                      batch_size: int = 100) -> dict[str, float]:
    """Like `evaluate`, on a fixed batch of episodes (e.g. read from a manifest)."""
    n = jax.tree.leaves(episodes)[0].shape[0]
    chunks = []
    for i, s in enumerate(range(0, n, batch_size)):
        part = jax.tree.map(lambda a, s=s: a[s:s + batch_size], episodes)
        chunks.append(episode_metrics(learner, meta, part, jax.random.fold_in(key, i)))
    return summarize({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})


def finite(x: Any) -> bool:
    """True when every entry of x is finite."""
    return bool(jnp.all(jnp.isfinite(jnp.asarray(x))))

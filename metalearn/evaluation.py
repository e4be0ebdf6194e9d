"""Evaluation of a learner on sampled episodes: mean query metrics with 95% confidence intervals."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from metalearn.core import (
    Array,
    Episode,
    InnerLearner,
    MetaParams,
    TaskSampler,
    check_predictions,
    episode_losses,
)


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
    return jax.jit(lambda meta, episodes, key: episode_losses(learner, meta, episodes, key)[1])


# compiled evaluation functions by learner (or sampler and batch size), the most recently used
# kept: a study that evaluates many learners must not hold every program and sampler's data
_CACHE: collections.OrderedDict[Any, Any] = collections.OrderedDict()
CACHE_SIZE = 16


def _compiled(key: Any, make: Callable[[], Any]) -> Any:
    """`make()` compiled once per hashable `key` (least recently used dropped past CACHE_SIZE);
    an unhashable key compiles per call."""
    try:
        fn = _CACHE.pop(key, None)
    except TypeError:
        return make()
    _CACHE[key] = fn = fn if fn is not None else make()
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return fn


def episode_metrics(learner: InnerLearner, meta: MetaParams, episodes: Episode,
                    key: Array) -> dict[str, np.ndarray]:
    """Per-episode metrics of a batch of episodes (leading axis), as NumPy arrays."""
    # learners are frozen dataclasses: equal configs share one compiled function
    fn = _compiled(learner, lambda: _episode_metrics_fn(learner))
    return {k: np.asarray(v) for k, v in fn(meta, episodes, key).items()}


def batch_sampler(sampler: TaskSampler, batch_size: int):
    """A compiled `key -> batch of episodes`, reused across calls (no recompile per evaluation).

    Uses the sampler's own `batch_sampler` when it has one (few-shot image samplers pass their
    data as an argument instead of baking it into the program).
    """
    if hasattr(sampler, "batch_sampler"):
        return sampler.batch_sampler(batch_size)
    return _compiled((sampler, batch_size),
                     lambda: jax.jit(lambda key: sampler.sample_batch(key, batch_size)))


def _chunks(key: Array, episodes: int, batch_size: int):
    """(size, sampling key, learner key) of each chunk of an evaluation."""
    for i, start in enumerate(range(0, episodes, batch_size)):
        k_s, k_l = jax.random.split(jax.random.fold_in(key, i))
        yield min(batch_size, episodes - start), k_s, k_l


def evaluate(learner: InnerLearner, meta: MetaParams, sampler: TaskSampler, key: Array,
             episodes: int = 1000, batch_size: int = 100,
             progress: str | None = None, check: bool = True) -> dict[str, float]:
    """Mean query loss/accuracy over `episodes` sampled episodes, with 95% CIs.

    Chunk i of `batch_size` episodes is drawn with key fold_in(key, i) (split into sampling and
    learner keys), so the episodes depend on `key`, `episodes` and `batch_size` only
    (`sample_episodes` returns them). `progress`: a label to show a progress bar under.
    """
    return summarize(episode_values(learner, meta, sampler, key, episodes, batch_size, progress,
                                    check))


def episode_values(learner: InnerLearner, meta: MetaParams, sampler: TaskSampler, key: Array,
                   episodes: int = 1000, batch_size: int = 100, progress: str | None = None,
                   check: bool = True) -> dict[str, np.ndarray]:
    """The per-episode metrics [episodes] that `evaluate` (same arguments) summarises."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    batch_size = min(batch_size, episodes)
    sample = batch_sampler(sampler, batch_size)
    chunks: list[dict[str, np.ndarray]] = []
    bar = None
    for n, k_s, k_l in _chunks(key, episodes, batch_size):
        batch = sample(k_s)
        if bar is None:
            # checked on the first episode drawn (`check=False` where the caller has checked
            # this learner and sampler already): no separate program for `sampler.example()`
            if check:
                check_predictions(learner, meta, jax.tree.map(lambda a: a[0], batch),
                                  "the evaluation sampler's episode")
            bar = _bar(episodes, progress)
        m = episode_metrics(learner, meta, batch, k_l)
        chunks.append({k: v[:n] for k, v in m.items()})
        bar.update(n)
    bar.close()
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean and 95% CI of the per-episode differences a - b of the metrics both have: two
    learners scored on the same episodes, compared episode by episode (the episodes' shared
    difficulty cancels, so the interval is narrower than the two side by side)."""
    return summarize({k: np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)
                      for k in a if k in b})


def sample_episodes(sampler: TaskSampler, key: Array, episodes: int,
                    batch_size: int = 100) -> Episode:
    """The episodes that `evaluate(..., sampler, key, episodes, batch_size)` scores, stacked."""
    batch_size = min(batch_size, episodes)
    sample = batch_sampler(sampler, batch_size)
    parts = [jax.tree.map(lambda a, n=n: a[:n], sample(k_s))
             for n, k_s, _ in _chunks(key, episodes, batch_size)]
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def _bar(total: int, label: str | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="episode", disable=label is None,
                dynamic_ncols=True, leave=False)


def evaluate_episodes(learner: InnerLearner, meta: MetaParams, episodes: Episode, key: Array,
                      batch_size: int = 100) -> dict[str, float]:
    """Like `evaluate`, on a fixed batch of episodes (e.g. read from a manifest)."""
    n = jax.tree.leaves(episodes)[0].shape[0]
    chunks = []
    for i, s in enumerate(range(0, n, batch_size)):
        part = jax.tree.map(lambda a, s=s: a[s:s + batch_size], episodes)
        chunks.append(episode_metrics(learner, meta, part, jax.random.fold_in(key, i)))
    return summarize({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})


def format_value(x: Any, ci: Any = None, digits: int = 4) -> str:
    """One figure as text: `0.1234 ± 0.0056` (a CI when given); tuples as `a / b`."""
    if x is None:
        return ""
    if isinstance(x, tuple | list):
        return " / ".join(format_value(v, digits=digits) for v in x)
    if not isinstance(x, int | float):
        return str(x)
    big = len(str(int(abs(x)))) if abs(x) < 1e15 else 0  # digits before the point
    s = f"{x:.{digits}f}" if abs(x) < 100 else f"{x:.{max(digits, big)}g}"
    # a CI of one episode is undefined (NaN): shown as nothing rather than "± nan"
    return s + (f" ± {format_value(ci, digits=digits)}"
                if isinstance(ci, int | float) and math.isfinite(ci) else "")


def format_metrics(res: dict, digits: int = 4) -> str:
    """`loss=0.1234 ± 0.0056  accuracy=...`: every numeric metric of a result with its CI."""
    keys = [k for k, v in res.items() if isinstance(v, int | float) and not isinstance(v, bool)
            and not k.endswith("_ci95") and k not in ("episodes", "step", "seed", "inner_steps")]
    return "  ".join(f"{k}={format_value(res[k], res.get(k + '_ci95'), digits)}" for k in keys)

"""Run configs: the fields every experiment has, their descriptions, and `--set` overrides.

A run's config is an `ml_collections.ConfigDict`: `base_config()`'s fields (steps, seed,
evaluation, checkpoints, the outer loop's section) plus the experiment's own. `apply_overrides`
applies `key.sub=value` strings to it, checking names and types; `field_docs` and
`describe_config` are what `metalearn config NAME` prints.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Sequence
from typing import Any

import ml_collections

from metalearn.messages import override
from metalearn.outer.registry import outer_config, outer_docs

ConfigDict = ml_collections.ConfigDict


def base_config(**overrides: Any) -> ConfigDict:
    """Fields every experiment has (steps, seed, evaluation, checkpoints, outer loop)."""
    c = ConfigDict({
        "experiment": "",
        "experiment_source": "",
        "seed": 0,
        "steps": 1000,
        "eval_every": 0,
        "eval_episodes": 1000,
        "eval_batch_size": 250,  # episodes per compiled evaluation call (memory vs speed)
        "test_episodes": 1000,
        "checkpoint_every": 0,
        "log_every": 1,
        "init_from": "",
        "outer": outer_config(),
    })
    for k, v in overrides.items():
        c[k] = v
    return c


BASE_DOCS = {
    "experiment": "the experiment's name (set by `metalearn train`)",
    "experiment_source": "where the experiment module was imported from: a module path or a "
                         "file (set by `metalearn train`; resume and evaluate import it again)",
    "seed": "seed of the run: initial meta-parameters and every episode drawn",
    "steps": "meta-steps in total (counting those before a --resume)",
    "eval_every": "evaluate on the validation (else test) split every N steps (0: at the end)",
    "eval_episodes": "episodes per periodic evaluation",
    "eval_batch_size": "episodes per compiled evaluation call (memory vs speed)",
    "test_episodes": "episodes of the final test evaluation (and of `metalearn evaluate`)",
    "checkpoint_every": "checkpoint every N steps (0: only at the end)",
    "log_every": "write training metrics every N steps",
    "init_from": "start from these meta-parameters instead of the learner's init: a run "
                 "directory (its latest checkpoint) or a name the learner offers (e.g. "
                 "gradient[:LR] for the Hebbian genome)",
    "outer.kind": "outer loop: gradient, evolution or truncated (PES / truncated backprop), or "
                  "one registered with metalearn.outer.registry; its fields are outer.KIND.*",
    "outer.batch_size": "episodes per meta-step (gradient) or per generation, shared by all "
                        "candidates (evolution)",
    "outer.steps_per_call": "meta-steps compiled into one call (speed only; same numbers)",
    "outer.shard": "split the batch / population across devices: auto, true or false",
}


def field_docs(module: Any = None) -> dict[str, str]:
    """One-line description of every config field: base fields, outer loops, the experiment's."""
    docs = {**BASE_DOCS, **outer_docs()}
    docs.update(getattr(module, "DOCS", {}))
    return docs


def describe_config(config: ConfigDict, docs: dict[str, str]) -> list[tuple[str, Any, str]]:
    """(dotted name, value, description) of every field of `config`, in order."""
    rows = []

    def walk(node: ConfigDict, prefix: str) -> None:
        for k, v in node.items():
            name = prefix + k
            if isinstance(v, ConfigDict):
                walk(v, name + ".")
            else:
                rows.append((name, v, docs.get(name, "")))

    walk(config, "")
    return rows


def parse_value(text: str, current: Any) -> Any:
    """The value of `--set KEY=TEXT` for a field whose current value is `current`."""
    low = text.strip().lower()
    if isinstance(current, bool) or low in ("true", "false"):
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if low in ("none", "null"):  # a string field keeps the word (e.g. task.augment=none)
        return text.strip() if isinstance(current, str) else None
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        v = text
    if isinstance(current, float) and isinstance(v, int):
        v = float(v)
    if isinstance(current, int) and isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(current, str) and not isinstance(v, str):
        v = text
    return v


def apply_overrides(config: ConfigDict, sets: Sequence[str]) -> ConfigDict:
    """Apply `key.sub=value` overrides; unknown keys and wrong types raise a clear error."""
    for s in sets:
        if "=" not in s:
            raise ValueError(f"{override(s)}: expected key=value")
        key, text = s.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for i, p in enumerate(parts[:-1]):
            if p not in node or not isinstance(node[p], ConfigDict):
                raise KeyError(f"{override(key)}: {'.'.join(parts[:i + 1])!r} is not a config "
                               f"section; sections here: "
                               f"{sorted(k for k, v in node.items() if isinstance(v, ConfigDict))}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            where = [f"{'.'.join([*parts[:-1], k, leaf])}" for k, v in node.items()
                     if isinstance(v, ConfigDict) and leaf in v]
            used = node.get("kind")  # the outer loop's own section first, where it has the field
            if isinstance(used, str) and isinstance(node.get(used), ConfigDict) \
                    and leaf in node[used]:
                where = [".".join([*parts[:-1], used, leaf])]
            where = where or ['.'.join([*parts[:-1], k]) for k in
                              difflib.get_close_matches(leaf, list(node.keys()), n=1)]
            hint = f" (did you mean {' or '.join(where)}?)" if where else ""
            raise KeyError(f"{override(key)}: no field {leaf!r}{hint}; fields here: "
                           f"{sorted(node.keys())}")
        cur = node[leaf]
        if isinstance(cur, ConfigDict):
            raise KeyError(f"{override(key)}: {key!r} is a section; set one of its fields: "
                           f"{sorted(cur.keys())}")
        try:
            val = parse_value(text, cur)
        except ValueError as e:
            raise ValueError(f"{override(key, text)}: {e}") from None
        if cur is not None and val is not None and not isinstance(val, type(cur)) and not (
                isinstance(cur, float) and isinstance(val, int)):
            kind = type(cur).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            raise TypeError(f"{override(key, text)}: expected {article} {kind} "
                            f"(current value {cur!r}), got {type(val).__name__}")
        with node.ignore_type():
            node[leaf] = val
    return config

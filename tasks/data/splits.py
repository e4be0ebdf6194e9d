"""Splits of an `ImageDataset` into disjoint train / validation / test classes.

"Unseen tasks" means held-out classes: split by class, by group (Omniglot alphabet) or by source
dataset, deterministically from a seed. `save_split` stores the class lists as JSON with the run
so that an evaluation uses exactly the held-out classes (`load_split`). `vinyals_split` is the
standard full-Omniglot split (1028 train + 172 validation = 1200 training characters, 423 test).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from metalearn.tasks.data.datasets import ImageDataset

Fractions = Mapping[str, float] | Sequence[tuple[str, float]]
DEFAULT_FRACTIONS = (("train", 0.7), ("validation", 0.1), ("test", 0.2))
SPLIT_FORMAT = "metalearn-split/1"


def _allocate(n: int, fractions: Fractions) -> list[tuple[str, int]]:
    """Integer sizes summing to n in proportion to `fractions` (largest remainder)."""
    items = list(fractions.items()) if isinstance(fractions, Mapping) else list(fractions)
    if not items:
        raise ValueError("a split needs at least one named part")
    w = np.asarray([f for _, f in items], np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {dict(items)}")
    exact = n * w / w.sum()
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    return [(name, int(s)) for (name, _), s in zip(items, sizes, strict=True)]


def _by_keys(ds: ImageDataset, keys: list[str], parts: Fractions | Mapping[str, Sequence[str]],
             seed: int, what: str) -> dict[str, ImageDataset]:
    """Assign each distinct key (class/group/source) to a part; parts get whole keys."""
    uniq = sorted(set(keys))
    explicit = isinstance(parts, Mapping) and parts and all(
        not isinstance(v, (int, float)) for v in parts.values())
    if explicit:
        assign: dict[str, str] = {}
        for name, members in parts.items():  # type: ignore[union-attr]
            unknown = sorted(set(members) - set(uniq))
            if unknown:
                raise KeyError(f"split {name!r}: unknown {what}s {unknown[:5]}; available: "
                               f"{uniq[:10]}{' ...' if len(uniq) > 10 else ''}")
            for m in members:
                if m in assign:
                    raise ValueError(f"{what} {m!r} is in both {assign[m]!r} and {name!r}")
                assign[m] = name
        names = list(parts)
    else:
        order = np.random.default_rng(seed).permutation(len(uniq))
        assign, start = {}, 0
        names = []
        for name, size in _allocate(len(uniq), parts):  # type: ignore[arg-type]
            names.append(name)
            for i in order[start:start + size]:
                assign[uniq[i]] = name
            start += size
    return {name: _part(ds, [i for i, k in enumerate(keys) if assign.get(k) == name], name)
            for name in names}


def _part(ds: ImageDataset, idx: Sequence[int], split: str) -> ImageDataset:
    """The classes `idx` of `ds` as split `split` (named e.g. 'omniglot:test' in messages)."""
    return dataclasses.replace(ds.subset(idx), name=f"{ds.name}:{split}")


def split_by_class(ds: ImageDataset, fractions: Fractions = DEFAULT_FRACTIONS,
                   seed: int = 0) -> dict[str, ImageDataset]:
    """Classes shuffled with `seed` and cut in proportion to `fractions` (name -> fraction)."""
    return _by_keys(ds, ds.class_names, fractions, seed, "class")


def split_by_group(ds: ImageDataset,
                   parts: Fractions | Mapping[str, Sequence[str]] = DEFAULT_FRACTIONS,
                   seed: int = 0) -> dict[str, ImageDataset]:
    """Whole groups (Omniglot alphabets) per split: fractions of the groups, shuffled with
    `seed`, or explicit lists {"train": ["Greek", ...], "test": [...]}."""
    return _by_keys(ds, ds.groups, parts, seed, "group")


def split_by_source(ds: ImageDataset, parts: Mapping[str, Sequence[str]] | Fractions,
                    seed: int = 0) -> dict[str, ImageDataset]:
    """Whole source datasets per split, e.g. {"train": ["omniglot"], "test": ["mnist"]}."""
    return _by_keys(ds, ds.sources, parts, seed, "source")


def save_split(path: str | Path, splits: Mapping[str, ImageDataset],
               meta: dict | None = None) -> Path:
    """Write each split's class names as JSON (kept with a run; `load_split` reads it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": SPLIT_FORMAT, **(meta or {}),
           "splits": {k: list(v.class_names) for k, v in splits.items()}}
    path.write_text(json.dumps(doc, indent=1))
    return path


def load_split(path: str | Path, dataset: ImageDataset) -> dict[str, ImageDataset]:
    """The splits saved by `save_split`, rebuilt from `dataset` by class name."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"split file {path} does not exist")
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or "splits" not in doc:
        raise ValueError(f"{path} is not a split file (no 'splits' entry)")
    return {k: dataclasses.replace(dataset.select(names), name=f"{dataset.name}:{k}")
            for k, names in doc["splits"].items()}


# Vinyals et al. (2016) / Snell et al. (2017) Omniglot split, as shipped by prototypical-networks
# and torchmeta: validation = 5 background alphabets; test = 12 evaluation alphabets plus
# Gurmukhi characters 42-45; train = every other character (1028).
VINYALS_VALIDATION = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
VINYALS_TEST = ("Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
                "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar",
                "Tibetan", "ULOG")
VINYALS_TEST_CHARACTERS = tuple(f"Gurmukhi/character{i}" for i in range(42, 46))
VINYALS_SIZES = {"train": 1028, "validation": 172, "test": 423}


def vinyals_split(ds: ImageDataset, validation: bool = True,
                  strict: bool = False) -> dict[str, ImageDataset]:
    """Train (1028) / validation (172) / test (423) Omniglot characters; `validation=False`
    merges train and validation (1200). `strict` demands the full 1623-character Omniglot."""
    def part(name: str) -> str:
        alphabet = name.split("/")[0]
        if alphabet in VINYALS_TEST or name in VINYALS_TEST_CHARACTERS:
            return "test"
        return "validation" if alphabet in VINYALS_VALIDATION and validation else "train"

    labels = [part(c) for c in ds.class_names]
    names = ["train", "validation", "test"] if validation else ["train", "test"]
    out = {n: _part(ds, [i for i, p in enumerate(labels) if p == n], n) for n in names}
    if strict:
        want = dict(VINYALS_SIZES) if validation else {"train": 1200, "test": 423}
        got = {k: v.num_classes for k, v in out.items()}
        if got != want:
            raise ValueError(f"vinyals_split expects the full Omniglot (background + evaluation, "
                             f"1623 characters) giving {want}, got {got}")
    return out

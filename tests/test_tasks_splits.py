"""Splits for unseen-task generalization: disjoint, covering, deterministic, saved and reloaded."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from metalearn.tasks import (
    concat,
    load_split,
    save_split,
    split_by_class,
    split_by_group,
    split_by_source,
    vinyals_split,
)
from metalearn.tasks.data import splits as S
from metalearn.tasks.testing import synthetic_dataset


@pytest.fixture(scope="module")
def ds():
    """40 classes in 5 groups."""
    return synthetic_dataset(classes=40, examples=2, size=2, groups=5)


def _names(parts):
    return {k: set(v.class_names) for k, v in parts.items()}


def _assert_partition(parts, ds):
    names = _names(parts)
    keys = list(names)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not (names[a] & names[b]), f"{a} and {b} share classes"
    assert set().union(*names.values()) == set(ds.class_names)


def test_split_by_class(ds):
    parts = split_by_class(ds, {"train": 0.6, "validation": 0.15, "test": 0.25}, seed=3)
    _assert_partition(parts, ds)
    assert {k: v.num_classes for k, v in parts.items()} == {"train": 24, "validation": 6,
                                                            "test": 10}
    assert parts["test"].name == "synthetic:test"  # error messages name the split
    again = split_by_class(ds, {"train": 0.6, "validation": 0.15, "test": 0.25}, seed=3)
    assert _names(again) == _names(parts)
    other = split_by_class(ds, {"train": 0.6, "validation": 0.15, "test": 0.25}, seed=4)
    assert _names(other) != _names(parts)
    # the images travel with their classes
    c = parts["test"].class_names[0]
    np.testing.assert_array_equal(parts["test"].images[0],
                                  ds.images[ds.class_names.index(c)])


def test_split_by_group(ds):
    parts = split_by_group(ds, {"train": 0.6, "test": 0.4}, seed=0)
    _assert_partition(parts, ds)
    groups = {k: set(v.groups) for k, v in parts.items()}
    assert len(groups["train"]) == 3 and len(groups["test"]) == 2
    assert not (groups["train"] & groups["test"])  # whole alphabets are held out
    fixed = split_by_group(ds, {"train": ["g0", "g1", "g2"], "test": ["g4"]})
    assert set(fixed["test"].groups) == {"g4"} and fixed["test"].num_classes == 8
    assert "g3" not in set(fixed["train"].groups)
    with pytest.raises(KeyError, match=re.escape("split 'test': unknown groups ['Klingon']")):
        split_by_group(ds, {"train": ["g0"], "test": ["Klingon"]})
    with pytest.raises(ValueError, match="group 'g0' is in both 'train' and 'test'"):
        split_by_group(ds, {"train": ["g0"], "test": ["g0"]})


def test_split_by_source():
    a = synthetic_dataset(classes=4, examples=2, size=2, name="omniglot")
    b = synthetic_dataset(classes=3, examples=2, size=2, name="mnist")
    b.class_names = [f"digit{i}" for i in range(3)]
    both = concat([a, b])
    parts = split_by_source(both, {"train": ["omniglot"], "test": ["mnist"]})
    assert parts["train"].class_names == a.class_names
    assert parts["test"].class_names == b.class_names


def test_allocation_and_bad_fractions():
    assert S._allocate(10, {"a": 1, "b": 1, "c": 1}) == [("a", 4), ("b", 3), ("c", 3)]
    assert S._allocate(7, [("train", 0.7), ("test", 0.3)]) == [("train", 5), ("test", 2)]
    with pytest.raises(ValueError, match="split fractions must be >= 0 with a positive sum"):
        S._allocate(5, {"a": -1, "b": 0})


def test_save_and_load_split(tmp_path, ds):
    parts = split_by_group(ds, {"train": 0.6, "test": 0.4}, seed=1)
    path = save_split(tmp_path / "run" / "split.json", parts, {"seed": 1, "by": "group"})
    doc = json.loads(path.read_text())
    assert doc["seed"] == 1 and doc["splits"]["test"] == parts["test"].class_names
    back = load_split(path, ds)
    assert {k: v.class_names for k, v in back.items()} == \
        {k: v.class_names for k, v in parts.items()}
    np.testing.assert_array_equal(back["test"].images, parts["test"].images)
    smaller = ds.subset(range(10))
    with pytest.raises(KeyError, match="classes are not in dataset 'synthetic' \\(10 classes\\)"):
        load_split(path, smaller)
    with pytest.raises(FileNotFoundError, match="split file .*nope.json does not exist"):
        load_split(tmp_path / "nope.json", ds)


def test_vinyals_split_rules():
    """Class names in the Omniglot layout go to the Vinyals/Snell train, validation or test."""
    names = ["Armenian/character01", "Hebrew/character22", "Gurmukhi/character41",
             "Gurmukhi/character42", "Gurmukhi/character45", "Tibetan/character01",
             "Latin/character01", "Angelic/character20"]
    ds = synthetic_dataset(classes=len(names), examples=1, size=2)
    ds.class_names = names
    parts = vinyals_split(ds)
    assert parts["validation"].class_names == names[:2]
    assert parts["test"].class_names == names[3:6]
    assert parts["train"].class_names == [names[2]] + names[6:]
    merged = vinyals_split(ds, validation=False)
    assert set(merged) == {"train", "test"} and merged["train"].num_classes == 5
    with pytest.raises(ValueError, match="vinyals_split expects the full Omniglot"):
        vinyals_split(ds, strict=True)
    assert sum(S.VINYALS_SIZES.values()) == 1623

"""The Omniglot evaluation protocols: which data, which class split, how rotations are used.

Published Omniglot numbers come from different protocols that are not comparable with each
other; `data.protocol` in the Omniglot experiments picks one of these:

- `vinyals`: Vinyals et al. 2016 / Snell et al. 2017, the one most tables use. The full Omniglot
  (1,623 characters), split 1,028 train / 172 validation / 423 test characters by alphabet
  (`splits.vinyals_split`); the 4 rotations of a character are 4 classes in every split, so
  episodes draw from 4,112 / 688 / 1,692 classes.
- `lake`: Lake et al. 2015's one-shot task. Train on the 30 background alphabets (5 held out
  for validation), test on the 20 evaluation alphabets, each test episode within one alphabet.
  Rotations are training classes only.
- `ht`: the HyperTransformer scripts (Zhmoginov et al. 2022). The 1,623 characters permuted
  with seed 2022, then 1,150 train / 50 validation / 423 test; in training each class of an
  episode is turned by a random multiple of 90 degrees (augmentation, no extra classes), no
  rotation at test.
- `minimal`: the two background-small sets (8 alphabets, 4 for training), for quick runs and
  the default test suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from metalearn.tasks.data.datasets import ImageDataset
from metalearn.tasks.data.folders import load_omniglot
from metalearn.tasks.data.splits import _part, split_by_group, vinyals_split

ROTATIONS = ("classes", "augment", "none")  # how a sampler uses 90-degree rotations


class Protocol(NamedTuple):
    """One protocol: its data, its split and how rotations and test episodes are drawn."""

    name: str
    full: bool  # the full Omniglot (else the minimal background-small sets)
    train_rotations: str  # one of ROTATIONS
    eval_rotations: str  # one of ROTATIONS
    eval_within_group: bool  # validation/test episodes from one alphabet
    sizes: dict[str, int] | None  # characters per split (checked on the full data)
    summary: str


# Characters per alphabet of the full Omniglot (Lake et al. 2015), 20 drawings each: the facts the
# protocols rest on (a test checks them against the data, `synthetic_omniglot` builds on them).
BACKGROUND_ALPHABETS = {
    "Alphabet_of_the_Magi": 20, "Anglo-Saxon_Futhorc": 29, "Arcadian": 26, "Armenian": 41,
    "Asomtavruli_(Georgian)": 40, "Balinese": 24, "Bengali": 46,
    "Blackfoot_(Canadian_Aboriginal_Syllabics)": 14, "Braille": 26, "Burmese_(Myanmar)": 34,
    "Cyrillic": 33, "Early_Aramaic": 22, "Futurama": 26, "Grantha": 43, "Greek": 24,
    "Gujarati": 48, "Hebrew": 22, "Inuktitut_(Canadian_Aboriginal_Syllabics)": 16,
    "Japanese_(hiragana)": 52, "Japanese_(katakana)": 47, "Korean": 40, "Latin": 26,
    "Malay_(Jawi_-_Arabic)": 40, "Mkhedruli_(Georgian)": 41, "N_Ko": 33,
    "Ojibwe_(Canadian_Aboriginal_Syllabics)": 14, "Sanskrit": 42, "Syriac_(Estrangelo)": 23,
    "Tagalog": 17, "Tifinagh": 55}
EVALUATION_ALPHABETS = {
    "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26,
    "Ge_ez": 26, "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47,
    "Manipuri": 40, "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46,
    "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26}
DRAWINGS = 20  # images per character

# the minimal sets: background small 1 minus the validation alphabet trains; the alphabets only
# background small 2 has are the test set (Greek and Latin are in both zips and load once)
MINIMAL_ALPHABETS = {"train": ("Balinese", "Early_Aramaic", "Korean", "Latin"),
                     "validation": ("Greek",),
                     "test": ("Japanese_(katakana)", "Sanskrit", "Tagalog")}
# lake: validation alphabets taken from the background set (Vinyals et al.'s validation five)
LAKE_VALIDATION = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
HT_SEED = 2022  # --shuffle_labels_seed of the HyperTransformer scripts
HT_SIZES = {"train": 1150, "validation": 50, "test": 423}
BACKGROUND, EVALUATION = "omniglot/images_background", "omniglot/images_evaluation"

PROTOCOLS = {
    "vinyals": Protocol("vinyals", True, "classes", "classes", False,
                        {"train": 1028, "validation": 172, "test": 423},
                        "full Omniglot, Vinyals et al.'s 1028/172/423 characters, rotations "
                        "as classes in every split"),
    "lake": Protocol("lake", True, "classes", "none", True,
                     {"train": 792, "validation": 172, "test": 659},
                     "full Omniglot, 25 background alphabets train, 5 validate, the 20 "
                     "evaluation alphabets test, test episodes within one alphabet"),
    "ht": Protocol("ht", True, "augment", "none", False, dict(HT_SIZES),
                   "full Omniglot, characters permuted (seed 2022), 1150/50/423, a random "
                   "90-degree rotation per training class"),
    "minimal": Protocol("minimal", False, "classes", "none", False, None,
                        "background-small sets, 4 train / 1 validation / 3 test alphabets"),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called `name`; KeyError listing the protocols otherwise."""
    if name not in PROTOCOLS:
        raise KeyError(f"unknown Omniglot protocol {name!r}; choose one of "
                       f"{', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def lake_split(ds: ImageDataset, validation: Sequence[str] = LAKE_VALIDATION
               ) -> dict[str, ImageDataset]:
    """Background alphabets (less `validation`) train, `validation` validates, the evaluation
    alphabets test: Lake et al.'s background / evaluation division."""
    sources = set(ds.sources)
    if not {BACKGROUND, EVALUATION} <= sources:
        raise ValueError(f"lake_split needs both full Omniglot sets ({BACKGROUND}, {EVALUATION}); "
                         f"dataset {ds.name!r} has {sorted(sources)}")
    bad = sorted(set(validation) - {g for g, s in zip(ds.groups, ds.sources, strict=True)
                                    if s == BACKGROUND})
    if bad:
        raise ValueError(f"lake_split: validation alphabets {bad} are not background alphabets")

    def part(i: int) -> str:
        if ds.sources[i] == EVALUATION:
            return "test"
        return "validation" if ds.groups[i] in validation else "train"

    labels = [part(i) for i in range(ds.num_classes)]
    return {n: _part(ds, [i for i, p in enumerate(labels) if p == n], n)
            for n in ("train", "validation", "test")}


def ht_split(ds: ImageDataset, seed: int = HT_SEED,
             sizes: dict[str, int] = HT_SIZES) -> dict[str, ImageDataset]:
    """Classes in a random order (`seed`), then the first `sizes["train"]` train, the next
    validate, the rest test: the HyperTransformer scripts' random class split.

    The classes are ordered by name (background alphabets, then evaluation) before the
    permutation; the official code permutes its own class order, so the class lists differ from
    its, the sizes and the kind of split do not."""
    if sum(sizes.values()) != ds.num_classes:
        raise ValueError(f"ht_split: sizes {sizes} sum to {sum(sizes.values())}, but dataset "
                         f"{ds.name!r} has {ds.num_classes} classes (the full Omniglot has 1623)")
    order = sorted(range(ds.num_classes),
                   key=lambda i: (ds.sources[i] != BACKGROUND, ds.class_names[i]))
    perm = np.asarray(order)[np.random.RandomState(seed).permutation(ds.num_classes)]
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = _part(ds, sorted(perm[start:start + n].tolist()), name)
        start += n
    return out


def protocol_split(ds: ImageDataset, protocol: str,
                   alphabets: dict[str, Sequence[str]] | None = None
                   ) -> dict[str, ImageDataset]:
    """The train / validation / test split of `protocol` (or, given `alphabets`, that explicit
    alphabet split of the protocol's data); the full protocols check their sizes."""
    p = get_protocol(protocol)
    if alphabets:
        return split_by_group(ds, {k: list(v) for k, v in alphabets.items() if v})
    if p.name == "minimal":
        return split_by_group(ds, {k: list(v) for k, v in MINIMAL_ALPHABETS.items()})
    if p.name == "vinyals":
        out = vinyals_split(ds)
    elif p.name == "lake":
        out = lake_split(ds)
    else:
        out = ht_split(ds)
    got = {k: v.num_classes for k, v in out.items()}
    if got != p.sizes:
        raise ValueError(f"protocol {p.name!r} expects the full Omniglot (1623 characters: "
                         f"{p.sizes}), got {got} from {ds.num_classes} characters; point "
                         "data.paths at images_background.zip and images_evaluation.zip or use "
                         "data.protocol=minimal")
    return out


def load_protocol(protocol: str, paths: Sequence[str | Path] | None = None,
                  image_size: int = 28, on_error: str = "raise") -> ImageDataset:
    """The Omniglot data `protocol` reads (`paths`, or its default full or minimal files)."""
    return load_omniglot(paths=list(paths) if paths else None, image_size=image_size,
                         on_error=on_error, full=get_protocol(protocol).full)


def synthetic_omniglot(examples: int = 2, size: int = 4, seed: int = 0) -> ImageDataset:
    """A stand-in with the full Omniglot's 1,623 class names, alphabets and background /
    evaluation sources but tiny random images, so the protocols run without the data."""
    names, groups, sources = [], [], []
    for src, table in ((BACKGROUND, BACKGROUND_ALPHABETS), (EVALUATION, EVALUATION_ALPHABETS)):
        for alphabet, n in sorted(table.items()):
            for i in range(1, n + 1):
                names.append(f"{alphabet}/character{i:02d}")
                groups.append(alphabet)
                sources.append(src)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(names), examples, size, size, 1), dtype=np.uint8)
    return ImageDataset(images, np.full(len(names), examples), names, groups, sources,
                        name="omniglot")

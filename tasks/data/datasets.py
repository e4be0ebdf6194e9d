"""The image dataset type: dense class-major uint8 arrays `[classes, examples, H, W, C]`.

An `ImageDataset` holds the images of class c as `images[c, :counts[c]]` (classes with fewer
examples are zero-padded up to the largest class), with a name and a group (alphabet, or the
dataset's name) per class. `concat` joins datasets and `from_numpy` groups labelled arrays into
one. Loaders live in `tasks.data.folders` (image folders and zips, Omniglot) and
`tasks.data.formats` (IDX, TFDS); `tasks.data.cache` keeps their decoded arrays as `.npz` files.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from metalearn.tasks.data.images import as_hw, resize_array


@dataclasses.dataclass(eq=False)
class ImageDataset:
    """Class-major images: `images[c, :counts[c]]` are the examples of class `class_names[c]`."""

    images: np.ndarray  # uint8 [classes, max_examples, H, W, C]
    counts: np.ndarray  # int32 [classes]
    class_names: list[str]  # e.g. "Greek/character01"
    groups: list[str]  # alphabet (Omniglot) or dataset name, per class
    sources: list[str] | None = None  # dataset each class came from (for splits by dataset)
    paths: list[list[str]] | None = None  # where each example was read from (manifests)
    name: str = "dataset"
    # how to read it again: {"loader": "module.function", "args": {...}} (None: it cannot be)
    origin: dict | None = None

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.counts = np.asarray(self.counts, dtype=np.int32).reshape(-1)
        self.class_names = [str(c) for c in self.class_names]
        self.groups = [str(g) for g in self.groups]
        if self.sources is None:
            self.sources = [self.name] * len(self.class_names)
        n = len(self.class_names)
        if self.images.dtype != np.uint8 or self.images.ndim != 5:
            raise ValueError(f"ImageDataset.images must be uint8 [classes, examples, H, W, C], "
                             f"got {self.images.dtype} {self.images.shape}")
        if not (self.images.shape[0] == self.counts.shape[0] == n == len(self.groups)
                == len(self.sources)):
            raise ValueError(f"ImageDataset: {self.images.shape[0]} classes of images, "
                             f"{self.counts.shape[0]} counts, {n} class names, "
                             f"{len(self.groups)} groups and {len(self.sources)} sources; "
                             "they must agree")
        if n and (self.counts.min() < 0 or self.counts.max() > self.images.shape[1]):
            raise ValueError(f"ImageDataset.counts must lie in [0, {self.images.shape[1]}], got "
                             f"[{self.counts.min()}, {self.counts.max()}]")
        if len(set(self.class_names)) != n:
            dup = sorted({c for c in self.class_names if self.class_names.count(c) > 1})[:5]
            raise ValueError(f"ImageDataset: duplicate class names {dup}")
        if self.paths is not None and len(self.paths) != n:
            raise ValueError(f"ImageDataset.paths lists {len(self.paths)} classes, expected {n}")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.images.shape[2:])  # type: ignore[return-value]

    @property
    def num_examples(self) -> int:
        """Total number of (unpadded) images."""
        return int(self.counts.sum())

    def subset(self, class_indices: Iterable[int]) -> ImageDataset:
        """The dataset restricted to `class_indices` (in that order)."""
        idx = np.asarray(list(class_indices), dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_classes):
            raise IndexError(f"class indices must lie in [0, {self.num_classes}), got "
                             f"[{idx.min()}, {idx.max()}]")
        pick = lambda xs: [xs[i] for i in idx]
        return dataclasses.replace(
            self, images=self.images[idx], counts=self.counts[idx],
            class_names=pick(self.class_names), groups=pick(self.groups),
            sources=pick(self.sources), paths=pick(self.paths) if self.paths else None)

    def select(self, names: Iterable[str]) -> ImageDataset:
        """The dataset restricted to the classes called `names` (KeyError lists missing ones)."""
        where = {c: i for i, c in enumerate(self.class_names)}
        names = list(names)
        missing = [c for c in names if c not in where]
        if missing:
            raise KeyError(f"{len(missing)} of {len(names)} classes are not in dataset "
                           f"{self.name!r} ({self.num_classes} classes): {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")
        return self.subset(where[c] for c in names)

    def filter_min_examples(self, n: int) -> ImageDataset:
        """Only the classes with at least `n` examples."""
        return self.subset(np.flatnonzero(self.counts >= n))

    def resized(self, size: int | tuple[int, int]) -> ImageDataset:
        """Every image resized (antialiased) to `size` (an int for square images)."""
        hw = as_hw(size)
        if hw == self.image_shape[:2]:
            return self
        c, m, _, _, ch = self.images.shape
        flat = self.images.reshape(c * m, *self.image_shape)
        out = np.stack([resize_array(im, hw) for im in flat]) if len(flat) else \
            np.zeros((0, *hw, ch), np.uint8)
        return dataclasses.replace(self, images=out.reshape(c, m, *hw, ch), origin=None)

    def spec(self) -> dict | None:
        """A JSON-able recipe that `reload` turns into this dataset again: its loader call and
        its classes (None for a dataset made in memory, which has no loader to call)."""
        if self.origin is None:
            return None
        return {"type": f"{reload.__module__}.reload",
                "fields": {"origin": self.origin, "classes": list(self.class_names),
                           "name": self.name}}

    def describe(self) -> dict:
        """JSON-able summary: name, classes, groups, image shape, examples per class (min, max)."""
        per_class = [int(self.counts.min()), int(self.counts.max())] if self.num_classes else [0, 0]
        return {"name": self.name, "classes": self.num_classes,
                "groups": len(set(self.groups)), "image_shape": list(self.image_shape),
                "examples": self.num_examples, "examples_per_class": per_class,
                "classes_sha1": hashlib.sha1("\n".join(self.class_names).encode()).hexdigest()}


def concat(datasets: Sequence[ImageDataset], name: str | None = None) -> ImageDataset:
    """One dataset holding the classes of all `datasets` (same image shape; e.g. Omniglot+MNIST)."""
    if not datasets:
        raise ValueError("concat needs at least one dataset")
    shapes = {d.image_shape for d in datasets}
    if len(shapes) != 1:
        raise ValueError(f"cannot concatenate datasets with image shapes {sorted(shapes)}; "
                         "load them with the same image_size and channels, or use .resized()")
    m = max(d.images.shape[1] for d in datasets)
    pad = lambda a: np.pad(a, [(0, 0), (0, m - a.shape[1])] + [(0, 0)] * 3)
    paths = None
    if all(d.paths is not None for d in datasets):
        paths = [p for d in datasets for p in d.paths]
    return ImageDataset(
        images=np.concatenate([pad(d.images) for d in datasets]),
        counts=np.concatenate([d.counts for d in datasets]),
        class_names=[c for d in datasets for c in d.class_names],
        groups=[g for d in datasets for g in d.groups],
        sources=[s for d in datasets for s in d.sources], paths=paths,
        name=name or "+".join(d.name for d in datasets))


def from_numpy(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
               groups: Sequence[str] | str | None = None, name: str = "numpy",
               image_size: int | tuple[int, int] | None = None) -> ImageDataset:
    """Group images `[N, H, W(, C)]` (uint8, or floats in [0, 1]) by integer label into a dataset.

    `class_names[label]` names each class (default: the label); classes are ordered by label.
    """
    images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, C], got shape {images.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating):
            if images.size and (images.min() < 0 or images.max() > 1):
                raise ValueError("float images must lie in [0, 1]; pass uint8 for 0..255")
            images = np.round(images * 255).astype(np.uint8)
        elif images.size and (images.min() < 0 or images.max() > 255):
            raise ValueError(f"integer images must lie in 0..255, got {images.dtype} in "
                             f"[{images.min()}, {images.max()}]")
        else:
            images = images.astype(np.uint8)
    if image_size is not None:
        images = np.stack([resize_array(im, image_size) for im in images]) if len(images) else \
            np.zeros((0, *as_hw(image_size), images.shape[-1]), np.uint8)
    uniq = np.unique(labels)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, uniq)
    counts = np.diff(np.append(starts, len(labels)))
    m = int(counts.max(initial=0))
    out = np.zeros((len(uniq), m, *images.shape[1:]), np.uint8)
    slot = np.arange(len(labels)) - np.repeat(starts, counts)
    out[np.repeat(np.arange(len(uniq)), counts), slot] = images[order]
    if class_names is None:
        names = [str(u) for u in uniq]
    else:
        if len(class_names) <= int(uniq.max(initial=0)):
            raise ValueError(f"class_names has {len(class_names)} entries but labels go up to "
                             f"{int(uniq.max())}")
        names = [str(class_names[int(u)]) for u in uniq]
    if groups is None or isinstance(groups, str):
        gs = [groups or name] * len(uniq)
    else:
        gs = [str(groups[int(u)]) for u in uniq]
    return ImageDataset(out, counts, names, gs, [name] * len(uniq), None, name=name)


def reload(origin: dict, classes: Sequence[str], name: str) -> ImageDataset:
    """The dataset `ImageDataset.spec` describes: its loader called again (cached loads are
    quick), restricted to `classes` in that order."""
    import importlib

    module, _, func = origin["loader"].rpartition(".")
    loader = getattr(importlib.import_module(module), func)
    ds = loader(**{k: list(v) if isinstance(v, tuple) else v for k, v in origin["args"].items()})
    return dataclasses.replace(ds.select(list(classes)), name=name)

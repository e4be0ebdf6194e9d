"""Datasets stored in other formats: MNIST-style IDX files (`read_idx`, `write_idx`, `load_idx`)
and TensorFlow Datasets image classification (`load_tfds`, read without TensorFlow, cached)."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metalearn.tasks.cache import cached
from metalearn.tasks.datasets import ImageDataset, from_numpy

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _open(path: Path, mode: str = "rb"):
    return gzip.open(path, mode) if path.suffix == ".gz" else open(path, mode)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally .gz) into a NumPy array."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, 4))
    body = 4 + 4 * ndim
    n = int(np.prod(dims)) * dtype.itemsize
    if len(data) - body != n:
        raise ValueError(f"{path}: header says shape {dims} ({n} bytes) but the file "
                         f"holds {len(data) - body} bytes of data")
    return np.frombuffer(data, dtype, offset=body).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip-compressed when the name ends in .gz)."""
    array = np.asarray(array)
    code = {np.dtype(v).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
    key = array.dtype.newbyteorder("=").str
    if key not in code:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    dt = _IDX_DTYPES[code[key]]
    header = bytes([0, 0, code[key], array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    with _open(Path(path), "wb") as f:
        f.write(header + array.astype(dt).tobytes())


def load_idx(images_path: str | Path, labels_path: str | Path, name: str = "idx",
             class_names: Sequence[str] | None = None,
             image_size: int | tuple[int, int] | None = None) -> ImageDataset:
    """MNIST-format `*-images-idx3-ubyte[.gz]` and `*-labels-idx1-ubyte[.gz]` files."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    return from_numpy(images, labels, class_names, name=name, image_size=image_size)


def load_tfds(name: str, split: str = "train", data_dir: str | Path | None = None,
              image_size: int | tuple[int, int] | None = None, image_key: str = "image",
              label_key: str = "label", download: bool = True,
              cache_dir: str | Path | None = None, cache: bool = True) -> ImageDataset:
    """Any TFDS image-classification dataset with `image` and `label` features (no TensorFlow
    needed: reads through `tfds.data_source`)."""
    import tensorflow_datasets as tfds

    def build() -> ImageDataset:
        src = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
        feats = tfds.builder(name, data_dir=data_dir).info.features
        for k in (image_key, label_key):
            if k not in feats:
                raise ValueError(f"TFDS dataset {name!r} has no feature {k!r}; features: "
                                 f"{sorted(feats.keys())}")
        recs = _read_all(src)
        images = np.stack([np.asarray(r[image_key]) for r in recs]) if recs else \
            np.zeros((0, 1, 1, 1), np.uint8)
        labels = np.asarray([int(r[label_key]) for r in recs])
        names = getattr(feats[label_key], "names", None)
        return from_numpy(images, labels, names, name=f"{name}/{split}", image_size=image_size)

    if not cache:
        return build()
    key = {"kind": "tfds", "name": name, "split": split, "data_dir": str(data_dir),
           "image_size": image_size, "image_key": image_key, "label_key": label_key}
    return cached(key, build, cache_dir, f"tfds-{name.replace('/', '_')}")


def _read_all(src, chunk: int = 4096) -> list:
    """Every record of a random-access data source (batched reads where supported)."""
    out: list = []
    for start in range(0, len(src), chunk):
        ids = list(range(start, min(start + chunk, len(src))))
        try:
            out.extend(src.__getitems__(ids))
        except (AttributeError, TypeError):  # no (working) batched read: one by one
            out.extend(src[i] for i in ids)
    return out

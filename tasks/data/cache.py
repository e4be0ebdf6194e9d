"""The `.npz` cache of decoded datasets: `cached(key, build, ...)` builds a dataset once and
reads it back from `cache_root()` (`cache_dir`, $METALEARN_CACHE or ~/.cache/metalearn) later;
files carry a checksum, are checked on load and rebuilt when corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from metalearn.tasks.data.datasets import ImageDataset

CACHE_VERSION = 1
CACHE_ENV = "METALEARN_CACHE"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where decoded datasets are cached: `cache_dir`, $METALEARN_CACHE or ~/.cache/metalearn."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "metalearn"))


def _digest(ds: ImageDataset) -> str:
    h = hashlib.sha1(ds.images.tobytes())
    h.update(ds.counts.astype("<i4").tobytes())
    h.update(json.dumps([ds.class_names, ds.groups, ds.sources, ds.paths, ds.name]).encode())
    return h.hexdigest()


def save_npz(path: Path, ds: ImageDataset) -> None:
    """Write a dataset to `path` (.npz, atomically) with a checksum of its contents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"version": CACHE_VERSION, "class_names": ds.class_names, "groups": ds.groups,
            "sources": ds.sources, "paths": ds.paths, "name": ds.name, "sha1": _digest(ds)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, images=ds.images, counts=ds.counts, meta=np.asarray(json.dumps(meta)))
    os.replace(tmp, path)


def load_npz(path: Path) -> ImageDataset:
    """Read a dataset written by `save_npz`; ValueError when it is corrupt or incomplete."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            images, counts, meta = z["images"], z["counts"], json.loads(str(z["meta"]))
        ds = ImageDataset(images, counts, meta["class_names"], meta["groups"], meta["sources"],
                          meta["paths"], meta["name"])
    except Exception as e:  # noqa: BLE001 - any failure to read means a corrupt cache file
        raise ValueError(f"corrupt dataset cache {path}: {type(e).__name__}: {e}") from e
    if meta.get("version") != CACHE_VERSION or meta.get("sha1") != _digest(ds):
        raise ValueError(f"corrupt dataset cache {path}: checksum mismatch")
    return ds


def cached(key: dict, build: Callable[[], ImageDataset], cache_dir: str | Path | None,
           stem: str) -> ImageDataset:
    """`build()` once; later calls with the same `key` read the .npz cache (rebuilt if corrupt)."""
    h = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / f"{stem}-{h}.npz"
    if path.exists():
        try:
            return load_npz(path)
        except ValueError as e:
            warnings.warn(f"{e}; rebuilding it", stacklevel=3)
    ds = build()
    try:
        save_npz(path, ds)
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path}: {e}", stacklevel=3)
    return ds

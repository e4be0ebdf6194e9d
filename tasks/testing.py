"""Small synthetic datasets and image folders for tests and examples (no downloads)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from metalearn.tasks.data.datasets import ImageDataset


def synthetic_dataset(classes: int = 12, examples: int | Sequence[int] = 6, size: int = 8,
                      channels: int = 1, groups: int = 3, seed: int = 0,
                      name: str = "synthetic") -> ImageDataset:
    """Random uint8 images; pixel [0, 0, 0] = class index and [0, 1, 0] = example index, so a
    test can tell which image it got. `examples` may list a count per class (padded table)."""
    rng = np.random.default_rng(seed)
    counts = np.full(classes, examples) if np.isscalar(examples) else np.asarray(examples)
    if len(counts) != classes:
        raise ValueError(f"examples lists {len(counts)} counts for {classes} classes")
    m = int(counts.max(initial=0))
    images = rng.integers(0, 256, (classes, m, size, size, channels), dtype=np.uint8)
    images[:, :, 0, 0, 0] = np.arange(classes)[:, None]
    images[:, :, 0, 1, 0] = np.arange(m)[None, :]
    images[np.arange(m)[None, :] >= counts[:, None]] = 0  # padding
    return ImageDataset(images, counts, [f"g{c % groups}/c{c:02d}" for c in range(classes)],
                        [f"g{c % groups}" for c in range(classes)], name=name)


def write_image_tree(root: str | Path, layout: Mapping[str, int], size: int = 16,
                     seed: int = 0, zip_path: str | Path | None = None,
                     top: str | None = None) -> dict[str, np.ndarray]:
    """Write `layout` = {"Alphabet/character01": n_images, ...} as grayscale PNGs under `root`
    (or into `zip_path`, under folder `top`); returns the uint8 [n, size, size] images per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    z = zipfile.ZipFile(zip_path, "w") if zip_path is not None else None
    try:
        for cname, n in layout.items():
            imgs = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
            out[cname] = imgs
            for i, im in enumerate(imgs):
                rel = Path(top or "") / cname / f"{i:04d}_{i + 1:02d}.png"
                if z is not None:
                    buf = io.BytesIO()
                    Image.fromarray(im).save(buf, format="PNG")
                    z.writestr(str(rel), buf.getvalue())
                else:
                    p = Path(root) / rel
                    p.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(im).save(p)
    finally:
        if z is not None:
            z.close()
    return out

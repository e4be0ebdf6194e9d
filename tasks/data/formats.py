"""Datasets stored in other formats: MNIST-style IDX files (`read_idx`, `write_idx`, `load_idx`),
TensorFlow Datasets image classification (`load_tfds`, read without TensorFlow, cached), and
`load_dataset`, which reads a dataset of the user's in any of the forms it knows (an image
folder, a pair of IDX files, a .npz) and shapes it like the images a run was trained on."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metalearn.tasks.data.cache import cached
from metalearn.tasks.data.datasets import ImageDataset, from_numpy
from metalearn.tasks.data.folders import _folder_tree, load_image_folder
from metalearn.tasks.data.images import IMAGE_SUFFIXES, decode_image

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


# ---------------------------------------------------------------- any dataset of the user's

DATASET_FORMS = (
    "an image folder (class/*.png or group/class/*.png) or a zip of one",
    "MNIST-format IDX files given as IMAGES,LABELS (e.g. t10k-images-idx3-ubyte.gz,"
    "t10k-labels-idx1-ubyte.gz), or a folder holding exactly one *images*idx* and one "
    "*labels*idx* file",
    "a .npz file with arrays x (or images) [N, H, W] or [N, H, W, C] uint8 and y (or labels) "
    "[N] integer labels",
    "sklearn:digits (scikit-learn's 1,797 handwritten digits, 8 x 8, shipped with the package: "
    "no download; pip install scikit-learn)",
)
_NPZ_IMAGES, _NPZ_LABELS = ("x", "images"), ("y", "labels")


def load_dataset(spec: str | Path, image_size: int | tuple[int, int] | None = None,
                 channels: int | None = None, name: str | None = None,
                 cache: bool = True, on_error: str = "raise") -> ImageDataset:
    """A labelled image dataset from an image folder or zip, IDX files or a .npz (see below).

    `spec` is one of: an image folder (`class/*.png` or `group/class/*.png`, as
    `load_image_folder` reads) or a zip of one; two IDX files `"IMAGES,LABELS"`, or a folder
    holding exactly one `*images*idx*` and one `*labels*idx*` file (optionally .gz); a `.npz`
    with arrays `x` (or `images`) [N, H, W(, C)] and `y` (or `labels`) [N] (and optionally
    `class_names`); or `sklearn:digits` (see `load_sklearn_digits`). `channels` (1 or 3; None
    keeps the data's) converts grayscale <-> RGB as
    image files are converted (RGB -> gray: PIL's ITU-R 601-2 luminance; gray -> RGB: the
    channel repeated), then `image_size` resizes (antialiased), so that the same images stored
    in any of the forms load alike. `name` defaults to the folder or file stem; `cache` keeps
    decoded image folders in the dataset cache (`tasks.data.cache`); `on_error="skip"` leaves out
    the files of an image folder that are not readable images (with a warning), as
    `load_image_folder` does."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None, got {channels!r}")
    if isinstance(spec, str) and spec.startswith("sklearn:"):
        if spec != "sklearn:digits":
            raise ValueError(f"dataset {spec!r}: the scikit-learn dataset shipped with the "
                             "package is sklearn:digits (the others are downloads)")
        x, y, names = load_sklearn_digits()
        return _from_arrays(x, y, names, image_size, channels, name or "sklearn_digits", spec)
    path = Path(spec).expanduser()
    if isinstance(spec, str) and "," in spec and not path.exists():
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"dataset {spec!r}: a comma separates exactly two IDX files, "
                             "IMAGES,LABELS (e.g. t10k-images-idx3-ubyte.gz,"
                             "t10k-labels-idx1-ubyte.gz)")
        images, labels = (Path(p).expanduser() for p in parts)
        for p, what in ((images, "images"), (labels, "labels")):
            if not p.exists():
                raise FileNotFoundError(f"dataset {spec!r}: the IDX {what} file {p} does not "
                                        "exist; give IMAGES,LABELS as paths to two existing files")
        return _idx_pair(images, labels, image_size, channels, name or _idx_stem(images))
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist; give {_forms()}")
    if path.is_dir():
        pair = _idx_in_folder(path)
        if pair is not None:
            return _idx_pair(*pair, image_size, channels, name or path.name)
        return _image_folder(path, image_size, channels, name or path.name, cache, on_error)
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".npz":
        return _npz(path, image_size, channels, name or path.stem)
    if path.suffix.lower() == ".zip":
        return _image_folder(path, image_size, channels, name or path.stem, cache, on_error)
    if "idx" in path.name.lower():
        raise ValueError(f"dataset {path} is a single IDX file; give the images and the labels "
                         "file together as IMAGES,LABELS (e.g. t10k-images-idx3-ubyte.gz,"
                         "t10k-labels-idx1-ubyte.gz), or the folder holding both")
    raise ValueError(f"dataset {path}: unknown format ({suffixes or 'no suffix'}); give "
                     f"{_forms()}")


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's handwritten digits (1,797 images of 10 classes, 8 x 8, ink counts 0-16)
    as uint8 images [N, 8, 8], dark ink on white as scikit-learn draws them and as the Omniglot
    files are stored; labels [N] and class names "0".."9"."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the dataset sklearn:digits needs scikit-learn: pip install "
                          "scikit-learn") from e
    d = load_digits()
    x = np.round(255.0 * (1.0 - d.images / 16.0)).astype(np.uint8)
    return x, d.target.astype(np.int64), [str(n) for n in d.target_names]


def _forms() -> str:
    return "; or ".join(DATASET_FORMS)


def _idx_stem(images: Path) -> str:
    """'t10k' from t10k-images-idx3-ubyte.gz (else the folder's name)."""
    stem = re.sub(r"(\.gz)$", "", images.name, flags=re.I)
    stem = re.sub(r"[-_.]?images.*$", "", stem, flags=re.I)
    return stem or images.resolve().parent.name


def _idx_in_folder(folder: Path) -> tuple[Path, Path] | None:
    """The (images, labels) IDX files of a folder; None when it holds no IDX files."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and "idx" in p.name.lower()]
    found = {k: [p for p in files if k in p.name.lower()] for k in ("images", "labels")}
    if not files:
        return None
    if len(found["images"]) == 1 and len(found["labels"]) == 1:
        return found["images"][0], found["labels"][0]
    names = ", ".join(p.name for p in files)
    raise ValueError(f"dataset folder {folder} holds the IDX files {names}, not exactly one "
                     "*images*idx* and one *labels*idx* file; name the pair you mean as "
                     "IMAGES,LABELS (e.g. t10k-images-idx3-ubyte.gz,t10k-labels-idx1-ubyte.gz)")


def _idx_pair(images: Path, labels: Path, image_size: int | tuple[int, int] | None,
              channels: int | None, name: str) -> ImageDataset:
    x, y = read_idx(images), read_idx(labels)
    return _from_arrays(x, y, None, image_size, channels, name, f"IDX files {images} and {labels}")


def _npz(path: Path, image_size: int | tuple[int, int] | None, channels: int | None,
         name: str) -> ImageDataset:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - not a zip, truncated, ...
        raise ValueError(f"dataset {path} is not a readable .npz file ({type(e).__name__}: "
                         f"{e}); write it with np.savez(path, x=images, y=labels)") from e
    with z:
        keys = set(z.files)
        xk = next((k for k in _NPZ_IMAGES if k in keys), None)
        yk = next((k for k in _NPZ_LABELS if k in keys), None)
        if xk is None or yk is None:
            raise ValueError(f"dataset {path} holds the arrays {sorted(keys)}, but needs images "
                             "as x (or images) and labels as y (or labels); write it with "
                             "np.savez(path, x=images, y=labels)")
        try:
            x, y = z[xk], z[yk]
            names = [str(n) for n in z["class_names"]] if "class_names" in keys else None
        except ValueError as e:  # object arrays need pickle
            raise ValueError(f"dataset {path}: {e}; store x and y as numeric arrays "
                             "(uint8 images, integer labels)") from e
    return _from_arrays(x, y, names, image_size, channels, name, f"dataset {path}")


def _from_arrays(x: np.ndarray, y: np.ndarray, class_names: list[str] | None,
                 image_size: int | tuple[int, int] | None, channels: int | None, name: str,
                 what: str) -> ImageDataset:
    """`from_numpy`, channels converted, then resized; errors name `what`."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what}: labels must be one label per image [N], got shape {y.shape}")
    if x.ndim not in (3, 4):
        raise ValueError(f"{what}: images must be [N, H, W] or [N, H, W, C], got shape "
                         f"{x.shape}")
    if len(x) != len(y):
        raise ValueError(f"{what}: {len(x)} images but {len(y)} labels; each image needs one "
                         "label")
    try:
        ds = from_numpy(x, y, class_names, name=name)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    ds = convert_channels(ds, channels)
    return ds.resized(image_size) if image_size is not None else ds


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> [..., 1] as PIL converts RGB to L (ITU-R 601-2, rounded)."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def convert_channels(ds: ImageDataset, channels: int | None) -> ImageDataset:
    """`ds` with 1 (grayscale) or 3 (RGB) channels, converted as PIL converts image files (an
    alpha channel is dropped); None or the same count keeps it."""
    have = ds.image_shape[-1]
    if channels is None or channels == have:
        return ds
    if have not in (1, 2, 3, 4) or channels not in (1, 3):
        raise ValueError(f"dataset {ds.name!r}: cannot convert {have}-channel images to "
                         f"{channels} channels (1: grayscale, 3: RGB)")
    images = ds.images[..., :3] if have in (3, 4) else ds.images[..., :1]  # without alpha
    if images.shape[-1] != channels:
        images = _luminance(images) if channels == 1 else np.repeat(images, 3, axis=-1)
    return dataclasses.replace(ds, images=np.ascontiguousarray(images))


def _image_folder(path: Path, image_size: int | tuple[int, int] | None, channels: int | None,
                  name: str, cache: bool, on_error: str = "raise") -> ImageDataset:
    with contextlib.ExitStack() as stack:
        files, _ = _folder_tree(path, stack)
        if not files:
            raise ValueError(f"dataset {path} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                             f"and no IDX files; give {_forms()}")
        if channels is None:  # the first image's: 1 when it is grayscale, else 3
            _, ref, read = files[0]
            rgb = decode_image(read(), None, 3, ref)
            gray = np.array_equal(rgb[..., 0], rgb[..., 1]) and \
                np.array_equal(rgb[..., 0], rgb[..., 2])
            channels = 1 if gray else 3
    return load_image_folder(path, image_size=image_size, channels=channels, name=name,
                             cache=cache, on_error=on_error)

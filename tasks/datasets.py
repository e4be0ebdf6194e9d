"""Image datasets as dense class-major uint8 arrays `[classes, examples, H, W, C]`.

Every loader returns an `ImageDataset`: the images of class c are `images[c, :counts[c]]` (classes
with fewer examples are zero-padded up to the largest class), with a name and a group (alphabet,
or the dataset's name) per class. Sources: folders of images in the Omniglot layout
(`alphabet/character/*.png`) and zips of it, MNIST-format IDX files, NumPy arrays and TFDS.
Decoded arrays are cached as `.npz` files (default `$METALEARN_CACHE` or `~/.cache/metalearn`),
checked on load and rebuilt when corrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CACHE_VERSION = 1
OMNIGLOT_ENV = "METALEARN_OMNIGLOT"
CACHE_ENV = "METALEARN_CACHE"
ZIP_SEP = "::"  # "archive.zip::member/path.png" names an image inside a zip


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
        hw = _hw(size)
        if hw == self.image_shape[:2]:
            return self
        c, m, _, _, ch = self.images.shape
        flat = self.images.reshape(c * m, *self.image_shape)
        out = np.stack([resize_array(im, hw) for im in flat]) if len(flat) else \
            np.zeros((0, *hw, ch), np.uint8)
        return dataclasses.replace(self, images=out.reshape(c, m, *hw, ch))

    def describe(self) -> dict:
        """JSON-able summary: name, classes, groups, image shape, examples per class."""
        return {"name": self.name, "classes": self.num_classes,
                "groups": len(set(self.groups)), "image_shape": list(self.image_shape),
                "examples": self.num_examples,
                "examples_per_class": [int(self.counts.min(initial=0)),
                                       int(self.counts.max(initial=0))],
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


# ---------------------------------------------------------------- images


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def resize_array(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a uint8 [H, W, C] image with antialiasing (PIL bilinear) to `size` = (H, W)."""
    from PIL import Image

    h, w = _hw(size)
    if image.shape[:2] == (h, w):
        return image
    chans = [np.asarray(Image.fromarray(image[..., i]).resize((w, h), Image.Resampling.BILINEAR))
             for i in range(image.shape[-1])]
    return np.stack(chans, axis=-1)


def decode_image(data: bytes | Path | str, image_size: int | tuple[int, int] | None = None,
                 channels: int = 1) -> np.ndarray:
    """Decode an image file (bytes or path) to uint8 [H, W, channels], resized if asked.

    This is the one preprocessing path for dataset images and for images named in a manifest.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if image_size is not None:
            h, w = _hw(image_size)
            if (im.height, im.width) != (h, w):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def read_image_ref(ref: str, image_size: int | tuple[int, int] | None, channels: int,
                   base: Path | None = None) -> np.ndarray:
    """Decode the image named by `ref`: a file path, or `archive.zip::member` inside a zip."""
    if ZIP_SEP in ref:
        archive, member = ref.split(ZIP_SEP, 1)
        apath = _resolve(archive, base)
        with zipfile.ZipFile(apath) as z:
            return decode_image(z.read(member), image_size, channels)
    return decode_image(_resolve(ref, base), image_size, channels)


def _resolve(p: str, base: Path | None) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and base is not None and not path.exists():
        path = base / path
    if not path.exists():
        raise FileNotFoundError(f"image file {p!r} not found (also looked in {base})")
    return path


# ---------------------------------------------------------------- folders and zips


@dataclasses.dataclass
class _ClassFiles:
    name: str
    group: str
    source: str
    refs: list[str]  # image references (paths or archive::member)
    read: list[Callable[[], bytes]]


def _folder_tree(root: Path, stack: contextlib.ExitStack
                 ) -> tuple[list[tuple[tuple[str, ...], str, Callable[[], bytes]]], str]:
    """(relative parts, reference, reader) of every image below a folder or in a zip (kept
    open by `stack` until the images are decoded)."""
    out = []
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                out.append((p.relative_to(root).parts, str(p), p.read_bytes))
        return out, root.name
    if zipfile.is_zipfile(root):
        z = stack.enter_context(zipfile.ZipFile(root))
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            name = info.filename
            if info.is_dir() or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            if "__MACOSX" in name or Path(name).name.startswith("."):
                continue
            out.append((tuple(Path(name).parts), f"{root}{ZIP_SEP}{name}",
                        lambda name=name, z=z: z.read(name)))
        return out, root.stem
    raise ValueError(f"{root} is neither a folder nor a zip file of images")


def _scan_classes(root: Path, stack: contextlib.ExitStack,
                  name: str | None = None) -> list[_ClassFiles]:
    """Classes below `root`: `group/class/*.png` (Omniglot) or `class/*.png`."""
    files, stem = _folder_tree(root, stack)
    # a single top-level folder shared by every file (images_background/...) is not a level
    while files and len({f[0][0] for f in files}) == 1 and min(len(f[0]) for f in files) > 2:
        files = [(f[0][1:], f[1], f[2]) for f in files]
    classes: dict[str, _ClassFiles] = {}
    for parts, ref, read in files:
        if len(parts) < 2:
            raise ValueError(f"{root}: image {ref} is not inside a class folder; expected "
                             "class/*.png or group/class/*.png")
        cname = "/".join(parts[:-1])
        group = parts[0] if len(parts) > 2 else (name or stem)
        c = classes.setdefault(cname, _ClassFiles(cname, group, name or stem, [], []))
        c.refs.append(ref)
        c.read.append(read)
    return [classes[k] for k in sorted(classes)]


def _dedup(class_lists: Sequence[list[_ClassFiles]]) -> list[_ClassFiles]:
    """Union of classes by name; a class met again (Greek in both minimal sets) is kept once."""
    seen: dict[str, _ClassFiles] = {}
    for classes in class_lists:
        for c in classes:
            if c.name not in seen:
                seen[c.name] = c
                continue
            old = seen[c.name]
            if sorted(Path(r).name for r in old.refs) != sorted(Path(r).name for r in c.refs):
                warnings.warn(f"class {c.name!r} appears in {old.source} and {c.source} with "
                              f"different files; keeping the one from {old.source}",
                              stacklevel=3)
    return [seen[k] for k in sorted(seen)]


def _decode_classes(classes: list[_ClassFiles], image_size: int | tuple[int, int] | None,
                    channels: int, name: str) -> ImageDataset:
    m = max((len(c.refs) for c in classes), default=0)
    imgs: list[np.ndarray] = []
    for c in classes:
        arrs = [decode_image(r(), image_size, channels) for r in c.read]
        shapes = {a.shape for a in arrs}
        if len(shapes) > 1:
            raise ValueError(f"class {c.name!r} has images of different sizes {sorted(shapes)}; "
                             "pass image_size=... to resize them at load time")
        imgs.append(np.stack(arrs))
    shapes = {a.shape[1:] for a in imgs}
    if len(shapes) > 1:
        raise ValueError(f"{name}: classes have images of different sizes {sorted(shapes)[:3]}; "
                         "pass image_size=... to resize them at load time")
    shape = shapes.pop() if shapes else (1, 1, channels)
    out = np.zeros((len(classes), m, *shape), np.uint8)
    for i, a in enumerate(imgs):
        out[i, :len(a)] = a
    return ImageDataset(out, [len(c.refs) for c in classes], [c.name for c in classes],
                        [c.group for c in classes], [c.source for c in classes],
                        [list(c.refs) for c in classes], name=name)


def load_image_folder(path: str | Path | Sequence[str | Path],
                      image_size: int | tuple[int, int] | None = None, channels: int = 1,
                      name: str | None = None, cache_dir: str | Path | None = None,
                      cache: bool = True) -> ImageDataset:
    """Images in `class/*.png` or `group/class/*.png` folders (or zips of them); classes with the
    same name in several sources are kept once. `image_size` resizes (antialiased) at load time."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"image folder or zip {p} does not exist")
    name = name or "+".join(p.stem for p in paths)

    def build() -> ImageDataset:
        with contextlib.ExitStack() as stack:
            lists = [_scan_classes(p, stack, name if len(paths) == 1 and p.is_dir() else None)
                     for p in paths]
            classes = _dedup(lists)
            if not classes:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in "
                                 f"{', '.join(map(str, paths))}")
            return _decode_classes(classes, image_size, channels, name)

    if not cache:
        return build()
    key = {"kind": "folder", "sources": [_stat(p) for p in paths], "image_size": image_size,
           "channels": channels, "name": name}
    return cached(key, build, cache_dir, name)


def _stat(p: Path) -> list:
    p = p.resolve()
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
        h = hashlib.sha1()
        for q in files:
            st = q.stat()
            h.update(f"{q.relative_to(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return [str(p), h.hexdigest()]
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------- Omniglot


def repo_root() -> Path:
    """The repository (or installed tree) holding `tasks/`."""
    return Path(__file__).resolve().parents[1]


def default_omniglot_paths() -> list[Path]:
    """$METALEARN_OMNIGLOT (paths separated by os.pathsep) or ../shared/data/omniglot/."""
    env = os.environ.get(OMNIGLOT_ENV)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    return [repo_root().parent / "shared" / "data" / "omniglot"]


def _omniglot_sources(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(
                f"Omniglot not found at {p}. Download images_background.zip and "
                "images_evaluation.zip (or the minimal images_background_small1/2.zip) from "
                "https://github.com/brendenlake/omniglot/tree/master/python and pass "
                f"load_omniglot(paths=[...]) or set {OMNIGLOT_ENV}=/path/to/folder_or_zip")
        if p.is_dir():
            zips = sorted(q for q in p.glob("images_*.zip"))
            subs = sorted(q for q in p.iterdir() if q.is_dir() and q.name.startswith("images_"))
            found = zips + [s for s in subs if s.with_suffix(".zip") not in zips]
            out.extend(found or [p])
        else:
            out.append(p)
    return out


def load_omniglot(paths: str | Path | Sequence[str | Path] | None = None,
                  cache_dir: str | Path | None = None, image_size: int | None = 28,
                  cache: bool = True) -> ImageDataset:
    """Omniglot (folders or zips, alphabet/character/*.png): classes "Alphabet/characterNN",
    groups = alphabets, ink black on white as stored; alphabets met twice are loaded once."""
    if paths is None:
        paths = default_omniglot_paths()
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    sources = _omniglot_sources([Path(p).expanduser() for p in paths])
    ds = load_image_folder(sources, image_size=image_size, channels=1, name="omniglot",
                           cache_dir=cache_dir, cache=cache)
    return dataclasses.replace(ds, sources=[_source_of(refs) for refs in ds.paths])


def _source_of(refs: list[str]) -> str:
    """'omniglot/images_background_small1' from an example's reference."""
    ref = refs[0] if refs else ""
    root = ref.split(ZIP_SEP)[0] if ZIP_SEP in ref else str(Path(ref).parents[2])
    return f"omniglot/{Path(root).stem}"


# ---------------------------------------------------------------- arrays, IDX, TFDS


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
            np.zeros((0, *_hw(image_size), images.shape[-1]), np.uint8)
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


# ---------------------------------------------------------------- cache


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

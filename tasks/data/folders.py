"""Image datasets from folders and zips in the `class/*.png` or `group/class/*.png` layout,
and Omniglot (`alphabet/character/*.png`, `$METALEARN_OMNIGLOT` or ../shared/data/omniglot).

Classes met in several sources are kept once; decoded datasets are cached (`tasks.data.cache`).
Files that are not readable images raise an error naming them, or with `on_error="skip"` are
left out with a warning. Zip members with absolute paths or `..` are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from metalearn.messages import setting
from metalearn.tasks.data.cache import cached
from metalearn.tasks.data.datasets import ImageDataset
from metalearn.tasks.data.images import (
    IMAGE_SUFFIXES,
    ZIP_READ_ERRORS,
    ZIP_SEP,
    ImageDecodeError,
    decode_image,
)

OMNIGLOT_ENV = "METALEARN_OMNIGLOT"
ON_ERROR = ("raise", "skip")  # what loaders do with files that are not readable images


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
            if name[:1] in ("/", "\\") or name[1:2] == ":" or \
                    ".." in name.replace("\\", "/").split("/"):
                raise ValueError(f"zip {root}: member {name!r} has an absolute path or '..'; "
                                 "refusing it. Members must be relative paths "
                                 "(class/image.png or group/class/image.png)")
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


def _decode_file(ref: str, read: Callable[[], bytes], image_size: int | tuple[int, int] | None,
                 channels: int) -> np.ndarray:
    """The image file `ref` decoded; ImageDecodeError naming it when it is not readable."""
    try:
        data = read()
    except ZIP_READ_ERRORS as e:
        raise ImageDecodeError(f"{ref} cannot be read from the zip ({type(e).__name__}: {e})") \
            from e
    return decode_image(data, image_size, channels, ref)


def _readable(classes: list[_ClassFiles], image_size: int | tuple[int, int] | None,
              channels: int, name: str, on_error: str) -> list[tuple[_ClassFiles, list]]:
    """Each class with its decoded images; with on_error="skip" files that are not readable
    images, and classes left without any, are left out with a warning."""
    out, skipped, dropped = [], [], []
    for c in classes:
        kept = dataclasses.replace(c, refs=[], read=[])
        arrs = []
        for ref, read in zip(c.refs, c.read, strict=True):
            try:
                arrs.append(_decode_file(ref, read, image_size, channels))
            except ImageDecodeError as e:
                if on_error != "skip":
                    fix = setting("on_error", "data.on_error", '"skip"')
                    raise ImageDecodeError(f"dataset {name!r}: {e}; {fix} leaves out the files "
                                           "that are not readable images") from e
                skipped.append(ref)
                continue
            kept.refs.append(ref)
            kept.read.append(read)
        if arrs:
            out.append((kept, arrs))
        else:
            dropped.append(c.name)
    if not out:
        raise ValueError(f"dataset {name!r}: none of the {len(skipped)} image files is a "
                         f"readable image: {_few(skipped)}")
    if skipped:
        gone = f"; dropped {len(dropped)} classes left without images: {_few(dropped)}" \
            if dropped else ""
        warnings.warn(f"dataset {name!r}: skipped {len(skipped)} files that are not readable "
                      f"images: {_few(skipped)}{gone}", stacklevel=2)
    return out


def _few(names: list[str], n: int = 3) -> str:
    """The first `n` names, comma-separated, with ' ...' when there are more."""
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _decode_classes(classes: list[_ClassFiles], image_size: int | tuple[int, int] | None,
                    channels: int, name: str, on_error: str = "raise") -> ImageDataset:
    decoded = _readable(classes, image_size, channels, name, on_error)
    classes = [c for c, _ in decoded]
    m = max((len(c.refs) for c in classes), default=0)
    imgs: list[np.ndarray] = []
    for c, arrs in decoded:
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
                      cache: bool = True, on_error: str = "raise") -> ImageDataset:
    """Images in `class/*.png` or `group/class/*.png` folders (or zips of them); classes with the
    same name in several sources are kept once. `image_size` resizes (antialiased) at load time.
    Files that are not readable images raise an error (`on_error="raise"`) or are left out with a
    warning (`on_error="skip"`), as are classes left without images."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
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
            return _decode_classes(classes, image_size, channels, name, on_error)

    origin = {"loader": f"{__name__}.load_image_folder",
              "args": {"path": [str(p.resolve()) for p in paths], "image_size": image_size,
                       "channels": channels, "name": name, "on_error": on_error}}
    if not cache:
        return dataclasses.replace(build(), origin=origin)
    key = {"kind": "folder", "sources": [_stat(p) for p in paths], "image_size": image_size,
           "channels": channels, "name": name}
    if on_error != "raise":  # skipping changes the result; "raise" keeps older cache keys valid
        key["on_error"] = on_error
    return dataclasses.replace(cached(key, build, cache_dir, name), origin=origin)


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
    return Path(__file__).resolve().parents[2]


def default_omniglot_paths(full: bool = False) -> list[Path]:
    """$METALEARN_OMNIGLOT (paths separated by os.pathsep) or ../shared/data/omniglot/ (the
    minimal sets; `full`: ../shared/data/omniglot/full/, the 1,623-character Omniglot)."""
    env = os.environ.get(OMNIGLOT_ENV)
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    root = repo_root().parent / "shared" / "data" / "omniglot"
    return [root / "full" if full else root]


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
                  cache: bool = True, on_error: str = "raise", full: bool = False
                  ) -> ImageDataset:
    """Omniglot (folders or zips, alphabet/character/*.png): classes "Alphabet/characterNN",
    groups = alphabets, ink black on white as stored; alphabets met twice are loaded once.
    Without `paths`: the minimal sets, or with `full=True` the full Omniglot (1,623 characters).
    `on_error` as in `load_image_folder` ("skip" leaves out unreadable files with a warning)."""
    if paths is None:
        paths = default_omniglot_paths(full)
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    sources = _omniglot_sources([Path(p).expanduser() for p in paths])
    ds = load_image_folder(sources, image_size=image_size, channels=1, name="omniglot",
                           cache_dir=cache_dir, cache=cache, on_error=on_error)
    origin = {"loader": f"{__name__}.load_omniglot",
              "args": {"paths": [str(p.resolve()) for p in sources], "image_size": image_size,
                       "on_error": on_error}}
    return dataclasses.replace(ds, sources=[_source_of(refs) for refs in ds.paths],
                               origin=origin)


def _source_of(refs: list[str]) -> str:
    """'omniglot/images_background_small1' from an example's reference."""
    ref = refs[0] if refs else ""
    root = ref.split(ZIP_SEP)[0] if ZIP_SEP in ref else str(Path(ref).parents[2])
    return f"omniglot/{Path(root).stem}"

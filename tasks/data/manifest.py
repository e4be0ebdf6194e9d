"""Episode manifests: fixed episodes as JSON or CSV files, one entry per image.

An entry names a dataset class and example index (`class`, `example`), a `rotation` in degrees (a
multiple of 90, counter-clockwise), an image file `path` (or `archive.zip::member`; a relative path
is taken from the working directory if it exists there, else from the manifest's folder) and,
outside the unlabeled set, its episode `label`. JSON files hold `{"format": MANIFEST_FORMAT, ...,
"episodes": [...]}` (or just the list of episodes), each episode `{"support": [...], "query":
[...], "unlabeled": [...]}` (unlabeled optional); an entry is an object, or the shorthand `[path,
label]` (`path` or `[path]` in the unlabeled set). CSV files hold one row per image with the
columns `episode, set, label, class, example, rotation, path`. The labels of an episode's support
are exactly 0..N-1 for its N classes and its query labels are among them. `read_manifest` checks
all this and names the file, row or episode and entry of anything wrong.
`export_manifest(sampler, ...)` (`FewShotSampler.export_manifest`) writes a sampler's episodes and
`manifest_episodes(sampler, path)` (`episodes_from_manifest`) reads them back through its
preprocessing.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import Array, Episode
from metalearn.tasks.data.datasets import ImageDataset
from metalearn.tasks.data.images import read_image_ref

if TYPE_CHECKING:
    from metalearn.tasks.fewshot import FewShotSampler

MANIFEST_FORMAT = "metalearn-episodes/1"
SETS = ("support", "query", "unlabeled")  # the image sets of an episode, in manifest order


def manifest_entry(ds: ImageDataset, c: int, j: int, rot: int, label: int | None) -> dict:
    """The manifest entry of example `j` of class `c`, rotated `rot` quarter turns."""
    e = {"class": ds.class_names[c], "example": j, "rotation": 90 * rot,
         "path": ds.paths[c][j] if ds.paths else ""}
    if label is not None:
        e["label"] = label
    return e


_CSV_FIELDS = ("episode", "set", "label", "class", "example", "rotation", "path")
_JSON_FORM = ('{"episodes": [{"support": [{"path": "a.png", "label": 0}, ...], '
              '"query": [...]}, ...]}')
_ENTRY_FORM = ('{"class": ..., "example": ..., "label": ...}, {"path": ..., "label": ...} or '
               '[path, label]')


def manifest_kind(path: Path) -> str:
    """'json' or 'csv' from the file name (ValueError for any other suffix)."""
    kind = path.suffix.lower().lstrip(".")
    if kind not in ("json", "csv"):
        raise ValueError(f"manifest {path}: use a .json or .csv file name")
    return kind


def write_manifest(path: str | Path, episodes: Sequence[dict], meta: dict | None = None) -> Path:
    """Write episodes (dicts of support/query/unlabeled entry lists) as .json or .csv."""
    path = Path(path)
    kind = manifest_kind(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "csv":
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
            wr.writeheader()
            for e, ep in enumerate(episodes):
                for s in SETS:
                    for it in ep.get(s, []):
                        wr.writerow({"episode": e, "set": s, **{k: it.get(k, "")
                                                                  for k in _CSV_FIELDS[2:]}})
    else:
        doc = {"format": MANIFEST_FORMAT, **(meta or {}), "episodes": list(episodes)}
        path.write_text(json.dumps(doc, indent=1))
    return path


def read_manifest(path: str | Path) -> list[dict]:
    """Episodes of a .json or .csv manifest, as dicts of support/query/unlabeled entry lists;
    entries are dicts with int `label`, `example` and `rotation` (ValueError if malformed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist")
    named = _read_json(path) if manifest_kind(path) == "json" else _read_csv(path)
    for name, ep in named:
        _check_labels(ep, f"manifest {path}: episode {name}")
    return [ep for _, ep in named]


def _read_json(path: Path) -> list[tuple[str, dict]]:
    """(index, episode) of each episode of a JSON manifest, entries checked."""
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"manifest {path} is not valid JSON ({e}); expected {_JSON_FORM}") \
            from e
    eps = doc.get("episodes") if isinstance(doc, dict) else doc
    if not isinstance(eps, list):
        found = f"keys {sorted(doc)}" if isinstance(doc, dict) else f"a {type(doc).__name__}"
        raise ValueError(f'manifest {path} has no "episodes" list (found {found}); expected '
                         f"{_JSON_FORM}")
    out = []
    for e, ep in enumerate(eps):
        where = f"manifest {path}: episode {e}"
        if not isinstance(ep, dict):
            raise ValueError(f"{where} is a {type(ep).__name__}, not an object "
                             '{"support": [...], "query": [...]}')
        ep = dict(ep)
        for s in SETS:
            if not isinstance(ep.get(s, []), list):
                raise ValueError(f"{where}: {s} is not a list of entries ({_ENTRY_FORM})")
            if s in ep:
                ep[s] = [_entry(it, s, f"{where} {s}[{i}]") for i, it in enumerate(ep[s])]
        out.append((str(e), ep))
    return out


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    """(episode column, episode) of each episode of a CSV manifest, rows checked."""
    episodes: dict[str, dict[str, list]] = {}
    try:
        with open(path, newline="") as f:
            rd = csv.DictReader(f)
            missing = {"episode", "set"} - set(rd.fieldnames or ())
            if missing:
                raise ValueError(f"manifest {path} lacks the CSV columns {sorted(missing)}; "
                                 f"columns: {', '.join(_CSV_FIELDS)}")
            for row in rd:
                where = f"manifest {path} row {rd.line_num}"
                if None in row:
                    raise ValueError(f"{where} has more fields than the header "
                                     f"({', '.join(rd.fieldnames)})")
                e, s = (row["episode"] or "").strip(), (row["set"] or "").strip().lower()
                if s not in SETS:
                    raise ValueError(f"{where}: set {row['set']!r} is not one of {SETS}")
                if not e:
                    raise ValueError(f"{where} has no episode")
                items = episodes.setdefault(e, {}).setdefault(s, [])
                raw = {k: v for k, v in row.items() if k not in ("episode", "set")}
                items.append(_entry(raw, s, f"{where} (episode {e} {s}[{len(items)}])"))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"manifest {path} is not a readable CSV file ({e})") from e
    return list(episodes.items())


def _entry(raw: Any, s: str, where: str) -> dict:
    """A manifest entry as a dict with int label/example/rotation; `[path, label]`, `[path]` and
    `path` become {"path": path(, "label": label)}. `where` names it in errors."""
    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, (list, tuple)) and len(raw) in (1, 2):
        raw = dict(zip(("path", "label"), raw, strict=False))
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {raw!r} is not an entry; expected {_ENTRY_FORM}")
    it = {k: v for k, v in raw.items() if v not in (None, "")}
    if "path" not in it and ("class" not in it or "example" not in it):
        raise ValueError(f"{where}: an entry needs 'class' and 'example', or 'path'; expected "
                         f"{_ENTRY_FORM}")
    if not isinstance(it.get("path", ""), str):
        raise ValueError(f"{where}: path {it['path']!r} is not a string")
    if "class" in it:
        it["class"] = str(it["class"])
    if "example" in it:
        j = _as_int(it["example"])
        if j is None or j < 0:
            raise ValueError(f"{where}: example {it['example']!r} is not an integer >= 0 (the "
                             "index of the image within its class)")
        it["example"] = j
    rot = _as_int(it.get("rotation", 0))
    if rot is None or rot % 90:
        raise ValueError(f"{where}: rotation {it['rotation']!r} is not a multiple of 90 "
                         "(degrees counter-clockwise)")
    it["rotation"] = rot
    if s != "unlabeled":
        if "label" not in it:
            raise ValueError(f"{where} has no label; give each support and query entry its "
                             "episode label 0..N-1")
        y = _as_int(it["label"])
        if y is None:
            raise ValueError(f"{where}: label {it['label']!r} is not an integer; labels are "
                             "0..N-1 for the N classes of the episode")
        it["label"] = y
    return it


def _as_int(v: Any) -> int | None:
    """`v` as an int when it is a whole number (3, 3.0, "3"), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return None
    if isinstance(v, int):
        return v
    try:
        f = float(v)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def _check_labels(ep: dict, where: str) -> None:
    """Support and query sets present, support labels exactly 0..N-1, query labels among them."""
    for s in ("support", "query"):
        if not ep.get(s):
            raise ValueError(f"{where} has no {s} images (keys: {', '.join(map(str, ep))}); "
                             "every episode needs support and query entries")
    ys = {it["label"] for it in ep["support"]}
    n = len(ys)
    if ys != set(range(n)):
        missing = sorted(set(range(n)) - ys)
        raise ValueError(f"{where}: the support labels {sorted(ys)} must be exactly "
                         f"0..{n - 1} ({n} classes, one label each); missing {missing}")
    extra = sorted({it["label"] for it in ep["query"]} - ys)
    if extra:
        raise ValueError(f"{where} has query labels {extra} that no support image has "
                         f"(support labels are 0..{n - 1})")


# ---------------------------------------------------------------- a sampler's episodes


def export_manifest(sampler: FewShotSampler, path: str | Path, key: Array,
                    num_episodes: int) -> Path:
    """Write the `num_episodes` episodes of `sampler.sample_batch(key, n)` as JSON/CSV."""
    manifest_kind(Path(path))
    if sampler.augment is not None:
        raise ValueError("export_manifest: this sampler distorts its images (augment="
                         f"{sampler.augment}), which a manifest cannot record; export from "
                         "sampler.replace(augment=None)")
    idx = jax.device_get(sampler.batch_indices(jax.random.split(key, num_episodes)))
    episodes = []
    ds = sampler.dataset
    for e in range(num_episodes):
        ep: dict[str, Any] = {}
        for s in SETS:
            r = getattr(idx, s)
            if r is None:
                continue
            ep[s] = [manifest_entry(ds, int(r.cls[e, i]), int(r.example[e, i]),
                                    int(r.rotation[e, i]),
                                    int(r.label[e, i]) if s != "unlabeled" else None)
                     for i in range(r.cls.shape[1])]
        episodes.append(ep)
    return write_manifest(path, episodes, {"sampler": sampler.describe()})

def manifest_episodes(sampler: FewShotSampler, path: str | Path) -> Episode:
    """Episodes listed in a manifest (batched: leading axis = episodes), preprocessed as in
    training. Entries name a dataset class + example index, or an image file path (also as
    a `[path, label]` pair); malformed manifests raise errors naming the episode and entry."""
    path = Path(path)
    episodes = read_manifest(path)
    if not episodes:
        raise ValueError(f"manifest {path} lists no episodes")
    sizes = {s: {len(ep.get(s, [])) for ep in episodes} for s in SETS}
    for s, n in sizes.items():
        if len(n) > 1:
            raise ValueError(f"manifest {path}: episodes have different numbers of {s} "
                             f"images {sorted(n)}; split it into manifests of equal shape")
    where = {c: i for i, c in enumerate(sampler.dataset.class_names)}
    h, w, ch = sampler.dataset.image_shape
    base = path.parent

    def load_set(s: str) -> tuple[Array, Array] | None:
        if sizes[s] == {0}:
            return None
        imgs, rots, labels = [], [], []
        for e, ep in enumerate(episodes):
            for i, it in enumerate(ep[s]):
                what = f"manifest {path}: episode {e} {s}[{i}]"
                imgs.append(_manifest_image(sampler.dataset, it, where, (h, w), ch, base, what))
                rots.append(it["rotation"] // 90 % 4)  # checked by read_manifest
                labels.append(it["label"] if s != "unlabeled" else 0)
        if any(rots) and h != w:
            raise ValueError(f"manifest {path} rotates non-square images ({h}x{w})")
        x = sampler.normalize_images(np.stack([np.rot90(im, k) for im, k in
                                            zip(imgs, rots, strict=True)]))
        n = len(episodes)
        return x.reshape(n, -1, h, w, ch), jnp.asarray(labels, jnp.int32).reshape(n, -1)

    (sx, sy), (qx, qy) = load_set("support"), load_set("query")
    un = load_set("unlabeled")
    return Episode(sx, sy, qx, qy, un[0] if un is not None else None)

def _manifest_image(ds: ImageDataset, it: dict, where: dict, hw: tuple[int, int], ch: int,
                    base: Path, what: str) -> np.ndarray:
    """The image of a manifest entry (checked by `read_manifest`): a dataset example, or the
    file at its path; errors are prefixed with `what` (the file, episode and entry)."""
    cname, j = it.get("class"), it.get("example")
    if cname in where and j is not None:
        c = where[cname]
        if j >= ds.counts[c]:
            raise ValueError(f"{what}: class {cname!r} has {ds.counts[c]} "
                             f"examples, example {j} does not exist")
        return ds.images[c, j]
    if "path" not in it:
        raise KeyError(f"{what}: class {cname!r} is not in the sampler's dataset "
                       f"({ds.num_classes} classes) and no image path is given")
    try:
        return read_image_ref(str(it["path"]), hw, ch, base)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{what}: {e}; replace the file or remove the entry") from e

"""Episode manifests: fixed episodes as JSON or CSV files, one entry per image.

An entry names a dataset class and example index (`class`, `example`), a `rotation` in degrees,
an image file `path` (or `archive.zip::member`) and, outside the unlabeled set, its episode
`label`. JSON files hold `{"format": MANIFEST_FORMAT, ..., "episodes": [...]}`; CSV files hold
one row per image with the columns `episode, set, label, class, example, rotation, path`.
`FewShotSampler.export_manifest` writes them and `episodes_from_manifest` reads them back.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from metalearn.tasks.datasets import ImageDataset

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
    """Episodes of a .json or .csv manifest, as dicts of support/query/unlabeled entry lists."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist")
    if manifest_kind(path) == "json":
        doc = json.loads(path.read_text())
        eps = doc["episodes"] if isinstance(doc, dict) else doc
        return [dict(ep) for ep in eps]
    episodes: dict[str, dict[str, list]] = {}
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        missing = {"episode", "set"} - set(rd.fieldnames or ())
        if missing:
            raise ValueError(f"manifest {path} lacks the CSV columns {sorted(missing)}; "
                             f"columns: {', '.join(_CSV_FIELDS)}")
        for row in rd:
            s = row["set"].strip().lower()
            if s not in SETS:
                raise ValueError(f"manifest {path}: set {row['set']!r} is not one of {SETS}")
            it = {k: v for k, v in row.items() if k not in ("episode", "set") and v not in
                  (None, "")}
            episodes.setdefault(row["episode"], {}).setdefault(s, []).append(it)
    return list(episodes.values())

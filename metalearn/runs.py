"""Run directories: config.json, metrics.jsonl, checkpoints/, plots/, summary.json."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and np.size(x) == 1:
        x = x.item()
    elif hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class Run:
    """A run directory; everything a run writes goes through this object."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create:  # read-only use (evaluate, compare, resume): never make a directory
            if not self.path.is_dir():
                raise FileNotFoundError(f"{self.path} does not exist or is not a directory; "
                                        "pass the --run-dir of a `metalearn train` run")
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "plots").mkdir(exist_ok=True)

    def holds_a_run(self) -> bool:
        """True when a run has trained here (metrics logged or checkpoints written)."""
        ck = self.checkpoint_dir
        return bool(self.metrics()) or (ck.is_dir() and any(p.name.isdigit()
                                                           for p in ck.iterdir()))

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live."""
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        """The metrics log, one JSON object per line."""
        return self.path / "metrics.jsonl"

    @property
    def writes(self) -> bool:
        """False in the processes other than 0 of a multi-process run: process 0 writes."""
        import jax

        return jax.process_index() == 0

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `obj` as JSON atomically (temporary file, then rename)."""
        p = self.path / name
        if not self.writes:
            return p
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")
        tmp.replace(p)
        return p

    def read_json(self, name: str) -> Any:
        """Read a JSON file of the run."""
        p = self.path / name
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist; is {self.path} a metalearn run "
                                    "directory (made by `metalearn train`)?")
        return json.loads(p.read_text())

    def log(self, records: list[dict]) -> None:
        """Append metric records (each with a `step` and a `split`)."""
        if not records or not self.writes:
            return
        with self.metrics_path.open("a") as f:
            for r in records:
                f.write(json.dumps(_jsonable(r)) + "\n")

    def metrics(self) -> list[dict]:
        """All metric records logged so far."""
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
        return out

    def truncate_metrics(self, step: int) -> None:
        """Drop records after `step` (when resuming from a checkpoint at `step`)."""
        if not self.writes:
            return
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics_path)

    def plot_curves(self, name: str = "learning_curves.png") -> Path | None:
        """Plot every logged metric against steps in a grid, train and eval splits overlaid."""
        if not self.writes:
            return None
        fig = curves_figure(self.metrics())
        if fig is None:
            return None
        p = self.path / "plots" / name
        p.parent.mkdir(exist_ok=True)
        save_figure(fig, p)
        return p


# ---------------------------------------------------------------- learning-curve plots

MAX_COLUMNS = 3  # panels per row of a learning-curve figure
SMOOTH_POINTS = 50  # a train curve longer than this is drawn as a moving average of ~this many


def metric_keys(records: Sequence[dict]) -> list[str]:
    """The plottable metrics of metric records (numbers; not step, split, time, CIs)."""
    return sorted({k for r in records for k, v in r.items()
                   if k not in ("step", "split", "time", "episodes") and not k.endswith("_ci95")
                   and isinstance(v, int | float) and not isinstance(v, bool)})


def splits_of(records: Sequence[dict]) -> list[str]:
    """The splits of metric records, sorted (a record without one is `train`)."""
    return sorted({r.get("split", "train") for r in records})


def series(records: Sequence[dict], key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of metric `key` in `split`, in logged order."""
    pts = [(r["step"], r[key]) for r in records
           if r.get("split", "train") == split and isinstance(r.get(key), int | float)]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = (np.asarray(a, np.float64) for a in zip(*pts, strict=True))
    return s, v


def moving_average(steps: np.ndarray, values: np.ndarray,
                   points: int = SMOOTH_POINTS) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, values, window): the curve averaged over windows of len // points steps.

    A curve of at most `points` values comes back as it is, with window 1."""
    if len(values) <= points:
        return steps, values, 1
    w = max(2, len(values) // points)
    return steps[w - 1:], np.convolve(values, np.ones(w) / w, mode="valid"), w


def _constant(values: np.ndarray) -> bool:
    return bool(np.allclose(values, values[0], rtol=1e-6, atol=1e-12))


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of a learning-curve figure: a metric and the references drawn on it.

    `references` are the `(name, suffix)` of metrics `<metric>_<suffix>` that are constant
    within every split (baselines such as `loss_gd`), drawn as dashed horizontal lines."""

    metric: str
    references: tuple[tuple[str, str], ...] = ()


def curve_panels(records: Sequence[dict]) -> list[Panel]:
    """The panels of a learning-curve figure; constant `<base>_<suffix>` go on `<base>`."""
    keys = metric_keys(records)
    splits = splits_of(records)
    refs: dict[str, list[tuple[str, str]]] = {}
    panels: list[str] = []
    for k in sorted(keys, key=len):  # a base is shorter than its references: resolved first
        vals = [series(records, k, sp)[1] for sp in splits]
        vals = [v for v in vals if len(v)]
        const = sum(len(v) for v in vals) >= 2 and all(_constant(v) for v in vals)
        cut = [i for i, c in enumerate(k) if c == "_"][::-1]  # longest base first
        base = next((k[:i] for i in cut if k[:i] in panels), None) if const else None
        if base is None:
            panels.append(k)
        else:
            refs.setdefault(base, []).append((k, k[len(base) + 1:]))
    return [Panel(k, tuple(refs.get(k, ()))) for k in keys if k in panels]


def grid_shape(n: int, max_columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """(rows, columns) of a grid of `n` panels, at most `max_columns` wide."""
    cols = max(1, min(n, max_columns))
    return -(-n // cols), cols


def split_label(split: str) -> str:
    """A split's name in a figure: the periodic evaluations (logged as `eval`) are on the
    validation split (the test split only where an experiment has none)."""
    return {"eval": "validation"}.get(split, split)


def split_color(split: str) -> str:
    """The colour of a split in a single run's figure (eval C0, train C1, as before)."""
    return {"eval": "C0", "train": "C1"}.get(split, "C4")


def reference_lines(records: Sequence[dict], name: str) -> list[tuple[str, float]]:
    """(split, value) of a constant metric: one per split, or one `""` when all agree."""
    vals = [(sp, float(v[0])) for sp in splits_of(records)
            if len(v := series(records, name, sp)[1])]
    if all(np.isclose(x, vals[0][1], rtol=1e-6) for _, x in vals):
        return [("", vals[0][1])]
    return vals


def style_axis(ax: Any, key: str, values: Sequence[float]) -> None:
    """Title, step axis, grid, legend; log scale for an all-positive `loss*` metric."""
    ax.set_xlabel("meta-step")
    ax.set_title(key)
    if key.startswith("loss") and len(values) and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def curves_figure(records: Sequence[dict]) -> Any | None:
    """The learning-curve figure of one run's metric records (None when nothing to plot)."""
    panels = curve_panels(records)
    if not panels:
        return None
    plt = pyplot()
    rows, cols = grid_shape(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.remove()
    for ax, panel in zip(axes.flat, panels, strict=False):
        k, shown = panel.metric, []
        for split in splits_of(records):
            s, v = series(records, k, split)
            if not len(v):
                continue
            c, shown = split_color(split), shown + list(v)
            if split == "train" and len(v) > SMOOTH_POINTS:  # raw steps faint, average on top
                ax.plot(s, v, lw=0.5, alpha=0.3, color=c)
                ms, mv, w = moving_average(s, v)
                ax.plot(ms, mv, lw=1.5, color=c, label=f"train ({w}-step mean)")
            else:
                ax.plot(s, v, label=split_label(split),
                        marker="o" if split != "train" else None, ms=3,
                        lw=1, color=c)
        for i, (name, suffix) in enumerate(panel.references):
            for split, y in reference_lines(records, name):  # dash-dot: a non-train split
                ax.axhline(y, ls="--" if split in ("", "train") else "-.", lw=1,
                           color=f"C{i + 2}",
                           label=f"{suffix} ({split_label(split)})" if split else suffix)
                shown.append(y)
        style_axis(ax, k, shown)
    fig.tight_layout()
    return fig


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a figure as PNG and close it."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path

"""Run directories: config.json, metrics.jsonl, checkpoints/, plots/, summary.json."""

from __future__ import annotations

import json
import math
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

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "plots").mkdir(exist_ok=True)

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints live."""
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        """The metrics log, one JSON object per line."""
        return self.path / "metrics.jsonl"

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `obj` as JSON atomically (temporary file, then rename)."""
        p = self.path / name
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
        if not records:
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
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.metrics_path)

    def plot_curves(self, name: str = "learning_curves.png") -> Path | None:
        """Plot every logged metric against steps, train and eval splits overlaid."""
        recs = self.metrics()
        if not recs:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted({k for r in recs for k, v in r.items()
                       if k not in ("step", "split", "time", "episodes")
                       and not k.endswith("_ci95")
                       and isinstance(v, int | float)})
        if not keys:
            return None
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
        for ax, k in zip(axes[0], keys, strict=True):
            for split in sorted({r.get("split", "train") for r in recs}):
                pts = [(r["step"], r[k]) for r in recs
                       if r.get("split", "train") == split and isinstance(r.get(k), int | float)]
                if not pts:
                    continue
                s, v = (np.asarray(a, np.float64) for a in zip(*pts, strict=True))
                if split == "train" and len(v) > 50:  # raw steps faint, moving average on top
                    w = max(2, len(v) // 50)
                    ax.plot(s, v, lw=0.5, alpha=0.3, color="C1")
                    ma = np.convolve(v, np.ones(w) / w, mode="valid")
                    ax.plot(s[w - 1:], ma, lw=1.5, color="C1", label=f"train ({w}-step mean)")
                else:
                    ax.plot(s, v, label=split, marker="o" if split != "train" else None,
                            ms=3, lw=1)
            ax.set_xlabel("meta-step")
            ax.set_title(k)
            if k.startswith("loss") and all(r.get(k, 1) > 0 for r in recs
                                            if isinstance(r.get(k), int | float)):
                ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        p = self.path / "plots" / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        return p

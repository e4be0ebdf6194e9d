"""Metric writers of the host loop: what `driver.run` calls with every metric record.

`JsonlWriter` appends them to the run's `metrics.jsonl`; `TensorBoardWriter` writes them as
TensorBoard scalars through tensorboardX (no TensorFlow). Any object with `on_records(records)`
(and optionally `close()`) is a `Callback` too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

from metalearn.runs import Run

TENSORBOARD_DIR = "tensorboard"


class Callback(Protocol):
    """What `run` calls on the host: every metric record as it is logged."""

    def on_records(self, records: list[dict]) -> None:
        """Records of train steps ({"step", "split": "train", "loss", ...}) or of an
        evaluation ({"step", "split": "eval", ...})."""


class JsonlWriter:
    """Metric records to the run's `metrics.jsonl`, one JSON object per line."""

    def __init__(self, run: Run):
        self.run = run

    def on_records(self, records: list[dict]) -> None:
        """Append the records."""
        self.run.log(records)


class TensorBoardWriter:
    """Metric records as TensorBoard scalars `<split>/<metric>` (tensorboardX event files).

    `purge_step` (a resume's step + 1) makes TensorBoard drop the events a resumed run wrote
    after its checkpoint, as `metrics.jsonl` drops those records."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        # event files are named by the second they were opened in: the first step in the name
        # keeps a resume's file from replacing one opened in the same second
        self.writer = SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=30,
                                    filename_suffix=f".s{purge_step or 0:09d}")

    def on_records(self, records: list[dict]) -> None:
        """Write every finite numeric field of the records as a scalar at its step (a NaN loss
        stays in metrics.jsonl; TensorBoard cannot draw it)."""
        for r in records:
            for k, v in r.items():
                if k not in ("step", "split") and isinstance(v, int | float) \
                        and not isinstance(v, bool) and math.isfinite(v):
                    self.writer.add_scalar(f"{r.get('split', 'train')}/{k}", v, r["step"])

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

"""Compare run directories: a Markdown table of their headline results, overlaid learning curves.

`metalearn compare RUN_DIR [RUN_DIR ...] [--out DIR] [--metric NAME]...` prints the table (one
row per run) and writes `comparison.md` and one PNG per metric (`loss.png`, `accuracy.png`, ...)
to `--out` (default `runs/compare-YYYYmmdd-HHMMSS`; `--no-save` writes nothing). From Python,
`compare(run_dirs, out=None)` writes nothing unless `out` is given.

`--reach PERCENT` adds, for each run, how many steps its validation curve suggests it needs to
reach that accuracy (`steps_to_reach`): a power law err = a * step^b fitted to the validation
error, since few-shot error curves are close to straight lines on log-log axes over a run's
later part. It is an extrapolation, printed as one: it says what budget a trend needs, not
what a longer run will score.

A headline result is every entry of a run's summary.json that is a metric result (a dict with
"episodes"): `validation`, `test`, `test_20way_5shot`, ...; its column shows `accuracy` (in
percent) when the result has one, else `loss`, as `mean ± 95% CI`. A run still training, or
stopped, has no summary.json yet: it is compared by its curves only, and the table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metalearn.runs import (
    Run,
    curve_panels,
    moving_average,
    pyplot,
    reference_lines,
    save_figure,
    series,
    split_label,
    splits_of,
    style_axis,
)

MISSING = "–"  # a cell a run has no value for
RESULT_ORDER = ("validation", "test")  # these result columns first, the others sorted after


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What a comparison reads of one run directory."""

    path: Path
    label: str
    config: dict
    summary: dict | None  # None: no summary.json yet (the run is training or was stopped)
    records: list[dict]  # metrics.jsonl


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The result of `compare`: the Markdown table, notes on the runs, the files written."""

    table: str
    notes: tuple[str, ...] = ()
    reach: tuple[str, ...] = ()  # `--reach`: one line per run
    figures: tuple[Path, ...] = ()
    markdown_path: Path | None = None

    def text(self) -> str:
        """The table followed by its notes, as Markdown."""
        reach = "".join(f"\n- {line}" for line in self.reach)
        return (self.table + "".join(f"\n\nNote: {n}" for n in self.notes)
                + (f"\n\nExtrapolated from the validation curves:{reach}" if reach else ""))


@dataclasses.dataclass(frozen=True)
class Reach:
    """`steps_to_reach`'s answer: the fitted power law and where it meets the target."""

    target: float  # accuracy, a fraction
    slope: float  # b in err = a * step^b (negative: the error falls)
    first_step: int  # the fit uses the evaluations from this step on
    points: int  # ... this many of them
    steps: float | None  # the step at which the fit reaches the target (None: it never does)
    reached_at: int | None  # the first evaluation at or above the target, if one is

    def text(self) -> str:
        """One line: where the curve reached the target, or where its trend would."""
        pct = f"{100 * self.target:.2f} %"
        if self.reached_at is not None:
            return f"reached {pct} at step {self.reached_at}"
        fit = (f"fit err ~ step^{self.slope:.2f} over {self.points} evaluations from step "
               f"{self.first_step}")
        if self.steps is None:
            return f"not approaching {pct}: the error does not fall ({fit})"
        return f"{pct} at about {self.steps:,.0f} steps ({fit})"


def steps_to_reach(steps: Sequence[float], accuracy: Sequence[float], target: float,
                   from_fraction: float = 0.25) -> Reach:
    """Where a power law fitted to the error 1 - accuracy of the evaluations at steps >=
    `from_fraction` x the last step reaches 1 - target (accuracy and target as fractions)."""
    s, acc = np.asarray(steps, np.float64), np.asarray(accuracy, np.float64)
    if not 0 < target < 1:
        raise ValueError(f"target={target}: an accuracy between 0 and 1 (exclusive)")
    if s.shape != acc.shape or s.ndim != 1:
        raise ValueError(f"steps {s.shape} and accuracy {acc.shape}: one value per evaluation")
    hit = np.flatnonzero(acc >= target)
    keep = (s >= from_fraction * s.max(initial=0)) & (s > 0) & (acc < 1)
    if keep.sum() < 3:
        raise ValueError(f"{int(keep.sum())} evaluations with steps >= {from_fraction} x the "
                         "last step: a fit needs at least 3 (evaluate more often, eval_every)")
    b, a = np.polyfit(np.log(s[keep]), np.log1p(-acc[keep]), 1)
    needed = float(np.exp((np.log1p(-target) - a) / b)) if b < 0 else None
    return Reach(target, float(b), int(s[keep].min()), int(keep.sum()), needed,
                 int(s[hit[0]]) if len(hit) else None)


def read_run(path: str | Path) -> RunRecord:
    """Read a run directory; a clear error when `path` is not one."""
    p = Path(path)
    made_by = "run directories are made by `metalearn train`"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass run directories ({made_by})")
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is a file, not a run directory ({made_by})")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is not a metalearn run directory: {p / 'config.json'} "
                                f"is missing ({made_by})")
    run = Run(p, create=False)
    summary = run.read_json("summary.json") if (p / "summary.json").exists() else None
    return RunRecord(p, p.name, run.read_json("config.json"), summary, run.metrics())


def _labelled(runs: list[RunRecord]) -> list[RunRecord]:
    """Runs whose directory names collide are labelled `parent/name`."""
    names = [r.label for r in runs]
    return [dataclasses.replace(r, label=f"{r.path.parent.name}/{r.label}")
            if names.count(r.label) > 1 else r for r in runs]


def results_of(summary: dict | None) -> dict[str, dict]:
    """The metric results (dicts with "episodes") of a summary, by name."""
    return {k: v for k, v in (summary or {}).items() if isinstance(v, dict) and "episodes" in v}


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def result_columns(runs: Sequence[RunRecord],
                   metrics: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(result, metric) of each result column: the headline metric, or each of `metrics`."""
    found: dict[str, list[dict]] = {}
    for r in runs:
        for name, res in results_of(r.summary).items():
            found.setdefault(name, []).append(res)
    order = [n for n in RESULT_ORDER if n in found] + sorted(set(found) - set(RESULT_ORDER))
    cols = []
    for name in order:
        has = {k for res in found[name] for k, v in res.items() if _is_number(v)}
        wanted = metrics or (["accuracy"] if "accuracy" in has else ["loss"])
        cols += [(name, m) for m in wanted if m in has]
    return cols


def _cell(res: dict | None, metric: str) -> str:
    from metalearn.evaluation import format_value  # imports JAX: not at `metalearn --help`

    if not res or not _is_number(res.get(metric)):
        return MISSING
    m, ci = res[metric], res.get(f"{metric}_ci95")
    ci = ci if _is_number(ci) and math.isfinite(ci) else None
    if "accuracy" in metric:  # in percent with 2 decimals, as few-shot papers report it
        return format_value(100 * m, None if ci is None else 100 * ci, digits=2)
    return format_value(m, ci, digits=4)


def _steps(r: RunRecord) -> str:
    if r.summary is not None:
        return str(r.summary.get("steps", r.config.get("steps", MISSING)))
    done = max((x.get("step", 0) for x in r.records), default=0)
    return f"{done} / {r.config.get('steps', '?')}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   right: Sequence[bool]) -> str:
    """A Markdown table with padded columns (`right`: right-aligned columns)."""
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header, *rows]]
    width = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]
    rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(width, right, strict=True)]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w)
                                 for c, w, r in zip(row, width, right, strict=True)) + " |"

    return "\n".join([line(cells[0]), line(rule), *(line(row) for row in cells[1:])])


def comparison_table(runs: Sequence[RunRecord], metrics: Sequence[str] | None = None) -> str:
    """The Markdown table of the runs' headline results, one row per run."""
    from metalearn.evaluation import format_value

    cols = result_columns(runs, metrics)
    header = ["run", "experiment", "seed", "steps", "steps/s", "final train loss"] + [
        f"{name} {m}" + (" (%)" if "accuracy" in m else "") for name, m in cols]
    rows = []
    for r in runs:
        s = r.summary or {}
        sps, ftl = s.get("steps_per_second"), s.get("final_train_loss")
        made_in_python = r.config.get("made_by") == "OuterLoop.run"
        rows.append([r.label,
                     "(Python)" if made_in_python else str(r.config.get("experiment", MISSING)),
                     str(r.config.get("seed") if r.config.get("seed") is not None else MISSING),
                     _steps(r),
                     format_value(sps, digits=3) if _is_number(sps) else MISSING,
                     format_value(ftl, digits=4) if _is_number(ftl) else MISSING]
                    + [_cell(results_of(r.summary).get(name), m) for name, m in cols])
    return markdown_table(header, rows, [False, False, True, True, True, True]
                          + [True] * len(cols))


def curve_metrics(runs: Sequence[RunRecord]) -> list[str]:
    """The metrics to plot: every panel of any run's learning curves (baselines excluded)."""
    return sorted({p.metric for r in runs for p in curve_panels(r.records)})


def comparison_figure(runs: Sequence[RunRecord], metric: str) -> Any | None:
    """One metric's curves of every run overlaid (None when no run logged it).

    Each run has its own colour: train as a thin moving-average line, other splits (eval) as
    solid lines with markers, constant baselines `<metric>_<suffix>` as dashed lines."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shown: list[float] = []
    for i, r in enumerate(runs):
        color, label = f"C{i % 10}", r.label
        for split in splits_of(r.records):
            s, v = series(r.records, metric, split)
            if not len(v):
                continue
            shown += list(v)
            if split == "train":
                s, v, _ = moving_average(s, v)
                ax.plot(s, v, lw=0.8, alpha=0.8, color=color, label=label)
            else:
                ax.plot(s, v, lw=1.5, marker="o", ms=3, color=color, label=label)
            label = "_" + label  # one legend entry per run
        refs = [ref for p in curve_panels(r.records) if p.metric == metric for ref in p.references]
        for (name, suffix), ls in zip(refs, ["--", ":", "-."] * len(refs), strict=False):
            for split, y in reference_lines(r.records, name):
                where = f" ({split_label(split)})" if split else ""
                ax.axhline(y, ls=ls, lw=1, color=color, label=f"{r.label}: {suffix}{where}")
                shown.append(y)
    if not shown:
        plt.close(fig)
        return None
    style_axis(ax, metric, shown)
    handles, labels = ax.get_legend_handles_labels()
    styles = [Line2D([], [], color="gray", lw=0.8, label="train (moving average)"),
              Line2D([], [], color="gray", lw=1.5, marker="o", ms=3,
                     label=split_label("eval"))]
    ax.legend(handles=handles + styles, labels=labels + [h.get_label() for h in styles],
              fontsize=8)
    fig.tight_layout()
    return fig


def _reach_lines(runs: Sequence[RunRecord], target: float) -> tuple[str, ...]:
    """`steps_to_reach` of each run's validation accuracy, or why it has none."""
    lines = []
    for r in runs:
        s, acc = series(r.records, "accuracy", "eval")
        try:
            lines.append(f"{r.label}: {steps_to_reach(s, acc, target).text()}")
        except ValueError as e:
            lines.append(f"{r.label}: no extrapolation: {e}")
    return tuple(lines)


def compare(run_dirs: Sequence[str | Path], out: str | Path | None = None,
            metrics: Sequence[str] | None = None, reach: float | None = None) -> Comparison:
    """Compare run directories: the table, and with `out` comparison.md and one PNG a metric;
    with `reach` (an accuracy in percent) the steps each validation curve suggests it needs."""
    if not run_dirs:
        raise ValueError("compare needs at least one run directory (made by `metalearn train`)")
    if reach is not None and not 0 < reach < 100:
        raise ValueError(f"reach={reach}: a validation accuracy in percent, between 0 and 100 "
                         "(e.g. --reach 95)")
    runs = _labelled([read_run(d) for d in run_dirs])
    metrics = list(dict.fromkeys(metrics)) if metrics else None
    if metrics:
        known = {k for r in runs for res in results_of(r.summary).values() for k in res
                 if not k.endswith("_ci95") and k != "episodes"} | set(curve_metrics(runs))
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise ValueError(f"--metric {', '.join(unknown)}: no run has it; metrics of these "
                             f"runs: {', '.join(sorted(known)) or 'none'}")
    notes = []
    for r in runs:
        if r.summary is None:
            notes.append(f"{r.label} has no summary.json: it is still training or was stopped "
                         "before its end (`metalearn train --resume --run-dir "
                         f"{r.path}` continues it from its last checkpoint, or runs the final "
                         "evaluation of a run whose training finished); only its learning "
                         "curves are compared.")
        if not r.records:
            notes.append(f"{r.label} has logged no metrics ({r.path / 'metrics.jsonl'} is "
                         "missing or empty): no learning curves.")
    comparison = Comparison(comparison_table(runs, metrics), tuple(notes),
                            _reach_lines(runs, reach / 100) if reach is not None else ())
    if out is None:
        return comparison
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for m in metrics or curve_metrics(runs):
        fig = comparison_figure(runs, m)
        if fig is not None:
            figures.append(save_figure(fig, out / (re.sub(r"[^\w.-]", "_", m) + ".png")))
    md = out / "comparison.md"
    sources = "\n".join(f"- {r.label}: `{r.path}`" for r in runs)
    images = "".join(f"\n![{f.stem}]({f.name})" for f in figures)
    md.write_text(f"{comparison.text()}\n\nRuns:\n{sources}\n{images}\n")
    return dataclasses.replace(comparison, figures=tuple(figures), markdown_path=md)


def default_out() -> Path:
    """runs/compare-YYYYmmdd-HHMMSS, the CLI's default output directory."""
    return Path("runs") / f"compare-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_command(args: argparse.Namespace) -> int:
    """`metalearn compare`: print the table, the notes and the files written."""
    out = None if args.no_save else (args.out or default_out())
    c = compare(args.run_dirs, out=out, metrics=args.metric, reach=args.reach)
    print(c.text())
    if c.markdown_path is not None:
        print(f"\ntable: {c.markdown_path}")
    for f in c.figures:
        print(f"figure: {f}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the `compare` subcommand on an `add_subparsers()` object."""
    p = subparsers.add_parser(
        "compare", help="compare runs: a Markdown table of results and overlaid learning curves",
        description="Compare run directories: one table row per run (headline results as "
                    "mean ± 95% CI, accuracy in percent) and one PNG per metric with every "
                    "run's learning curves.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories made by `metalearn train`")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where comparison.md and the figures go (default: "
                        "runs/compare-YYYYmmdd-HHMMSS)")
    p.add_argument("--no-save", action="store_true", help="only print the table; write no files")
    p.add_argument("--metric", action="append", metavar="NAME",
                   help="metric to show instead of the headline one (accuracy, else loss); "
                        "repeat for several; also limits the figures to these metrics")
    p.add_argument("--reach", type=float, default=None, metavar="PERCENT",
                   help="also print the steps at which each run's validation accuracy would "
                        "reach PERCENT, from a power law fitted to the validation error over "
                        "the last three quarters of the run (an extrapolation)")
    p.set_defaults(fn=run_command)
    return p

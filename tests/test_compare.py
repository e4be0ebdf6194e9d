"""`metalearn compare` (metalearn/compare.py) and the grid layout of `Run.plot_curves`."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from metalearn import compare as cmp
from metalearn.runs import Run, curve_panels, curves_figure, grid_shape, moving_average

PNG = b"\x89PNG\r\n\x1a\n"
SETS = ["steps=20", "eval_every=10", "checkpoint_every=0", "test_episodes=50", "eval_episodes=50"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two real linreg_sgd runs (seeds 0 and 1), trained once for the module."""
    from metalearn.training import train

    root = tmp_path_factory.mktemp("runs")
    for name, seed in (("a", 0), ("b", 1)):
        train("linreg_sgd", SETS, seed=seed, run_dir=root / name, progress=False)
    return [root / "a", root / "b"]


def _summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def _rows(table: str) -> tuple[list[str], list[list[str]]]:
    """Header and data rows of a Markdown table."""
    lines = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in table.splitlines()]
    assert all(set(c) <= set("-:") for c in lines[1])  # the alignment rule
    return lines[0], lines[2:]


def _mean_ci(cell: str) -> tuple[float, float]:
    m, ci = cell.split("±")
    return float(m), float(ci)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints"))
    return dst


def test_table_has_one_row_per_run_with_the_summary_numbers(runs):
    c = cmp.compare(runs)
    header, rows = _rows(c.table)
    assert header == ["run", "experiment", "seed", "steps", "steps/s", "final train loss",
                      "test loss"]
    assert [r[0] for r in rows] == ["a", "b"]
    assert c.figures == () and c.markdown_path is None and c.notes == ()  # out=None: no files
    for d, row in zip(runs, rows, strict=True):
        s = _summary(d)
        assert row[1:4] == ["linreg_sgd", str(s["seed"]), "20"]
        assert float(row[4]) == pytest.approx(s["steps_per_second"], abs=5e-4)
        assert float(row[5]) == pytest.approx(s["final_train_loss"], abs=5e-5)
        m, ci = _mean_ci(row[6])
        assert m == pytest.approx(s["test"]["loss"], abs=5e-5)
        assert ci == pytest.approx(s["test"]["loss_ci95"], abs=5e-5)
    assert [_summary(d)["seed"] for d in runs] == [0, 1]


def test_accuracy_in_percent_missing_columns_and_metric_override(runs, tmp_path):
    c_dir = _copy(runs[1], tmp_path / "c")
    s = _summary(c_dir)
    s["validation"] = {"loss": 1.25, "loss_ci95": 0.5, "accuracy": 0.51234, "accuracy_ci95": 0.0045,
                       "episodes": 100}
    s["test_20way_5shot"] = {"loss": 2.0, "loss_ci95": "nan", "accuracy": 0.25, "episodes": 1}
    (c_dir / "summary.json").write_text(json.dumps(s))
    header, rows = _rows(cmp.compare([runs[0], c_dir]).table)
    assert header[6:] == ["validation accuracy (%)", "test loss", "test_20way_5shot accuracy (%)"]
    assert rows[0][6:] == [cmp.MISSING, rows[0][7], cmp.MISSING]  # run a: test loss only
    assert rows[1][6] == "51.23 ± 0.45"
    assert rows[1][8] == "25.00"  # a CI that is not a number is left out
    header, rows = _rows(cmp.compare([runs[0], c_dir], metrics=["loss"]).table)
    assert header[6:] == ["validation loss", "test loss", "test_20way_5shot loss"]
    assert rows[1][6] == "1.2500 ± 0.5000" and rows[1][8] == "2.0000"


def test_figures_overlay_every_run(runs, tmp_path):
    c = cmp.compare(runs, out=tmp_path / "cmp")
    assert {f.name for f in c.figures} == {"loss.png", "grad_norm.png"}
    for f in c.figures:
        assert f.parent == tmp_path / "cmp" and f.read_bytes()[:8] == PNG
    assert c.markdown_path == tmp_path / "cmp" / "comparison.md"
    assert c.table in c.markdown_path.read_text()
    fig = cmp.comparison_figure([cmp.read_run(d) for d in runs], "loss")
    ax = fig.axes[0]
    # per run: train (moving average) and eval (markers), in the run's own colour
    assert len(ax.lines) == 4
    assert [ln.get_color() for ln in ax.lines] == ["C0", "C0", "C1", "C1"]
    assert sorted(ln.get_marker() for ln in ax.lines) == ["None", "None", "o", "o"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["a", "b"] and "validation" in legend and "eval" not in legend
    assert cmp.comparison_figure([cmp.read_run(runs[0])], "accuracy") is None


def test_run_without_summary_is_compared_by_its_curves(runs, tmp_path):
    stopped = _copy(runs[0], tmp_path / "stopped")
    (stopped / "summary.json").unlink()
    c = cmp.compare([runs[1], stopped], out=tmp_path / "cmp")
    _, rows = _rows(c.table)
    assert rows[1][0] == "stopped" and rows[1][3] == "20 / 20"
    assert rows[1][4:] == [cmp.MISSING] * 3
    assert len(c.notes) == 1 and "no summary.json" in c.notes[0] and "--resume" in c.notes[0]
    assert "Note: stopped has no summary.json" in c.text()
    assert len(cmp.comparison_figure([cmp.read_run(d) for d in (runs[1], stopped)],
                                     "loss").axes[0].lines) == 4


def test_clear_errors(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing.*metalearn train"):
        cmp.compare([runs[0], tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cmp.compare([tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="at least one run directory"):
        cmp.compare([])
    with pytest.raises(ValueError, match=r"--metric accurcy: no run has it.*loss"):
        cmp.compare(runs, metrics=["accurcy"])


def test_same_directory_names_get_their_parent(runs, tmp_path):
    other = _copy(runs[0], tmp_path / "x" / "a")
    _, rows = _rows(cmp.compare([runs[0], other]).table)
    assert rows[0][0].endswith("/a") and rows[1][0] == "x/a"


def test_command_through_its_parser(runs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cmp.add_parser(parser.add_subparsers())
    out = tmp_path / "cmp"
    args = parser.parse_args(["compare", *map(str, runs), "--out", str(out),
                              "--metric", "loss"])
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| run ") and f"table: {out / 'comparison.md'}" in printed
    assert f"figure: {out / 'loss.png'}" in printed and "grad_norm" not in printed
    assert [p.name for p in sorted(out.iterdir())] == ["comparison.md", "loss.png"]
    args = parser.parse_args(["compare", str(runs[0]), "--no-save"])
    assert args.fn(args) == 0 and "figure:" not in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: at least one RUN_DIR
        parser.parse_args(["compare"])


def _fake_icl_run(path: Path) -> Run:
    run = Run(path)
    recs = []
    for s in range(1, 101):
        recs.append({"step": s, "split": "train", "loss": 1 / s, "accuracy": 1 - 1 / s,
                     "model_cos": 0.9 - 1 / s, "loss_gd": 0.2074, "loss_interp": 0.3 / s})
        if s % 25 == 0:
            recs.append({"step": s, "split": "eval", "loss": 1.1 / s, "loss_ci95": 0.01,
                         "loss_gd": 0.21, "loss_lstsq": 0.05, "episodes": 100})
    run.log(recs)
    return run


def test_plot_curves_grid_and_constant_baselines_as_reference_lines(tmp_path):
    run = _fake_icl_run(tmp_path / "icl")
    panels = curve_panels(run.metrics())
    # loss_gd and loss_lstsq are constant within each split: lines on the loss panel;
    # loss_interp changes over the steps: a panel of its own
    assert [(p.metric, p.references) for p in panels] == [
        ("accuracy", ()), ("loss", (("loss_gd", "gd"), ("loss_lstsq", "lstsq"))),
        ("loss_interp", ()), ("model_cos", ())]
    fig = curves_figure(run.metrics())
    assert len(fig.axes) == 4
    assert {ax.get_subplotspec().get_gridspec().get_geometry() for ax in fig.axes} == {(2, 3)}
    loss = next(ax for ax in fig.axes if ax.get_title() == "loss")
    refs = {ln.get_label(): ln for ln in loss.lines if ln.get_linestyle() in ("--", "-.")}
    assert set(refs) == {"gd (validation)", "gd (train)", "lstsq"}
    assert np.allclose(refs["gd (train)"].get_ydata(), 0.2074)
    assert refs["lstsq"].get_linestyle() == "--" and refs["gd (validation)"].get_linestyle() == "-."
    p = run.plot_curves()
    assert p == run.path / "plots" / "learning_curves.png" and p.read_bytes()[:8] == PNG
    from PIL import Image

    assert Image.open(p).size == (1386, 748)  # 3 columns x 2 rows of 4.2 x 3.4 in at 110 dpi


def test_grid_and_moving_average_helpers():
    assert [grid_shape(n) for n in (1, 2, 3, 4, 7)] == [(1, 1), (1, 2), (1, 3), (2, 3), (3, 3)]
    s, v = np.arange(1.0, 11.0), np.arange(10.0)
    assert moving_average(s, v)[2] == 1  # short curves stay as they are
    s, v = np.arange(1.0, 201.0), np.arange(200.0)
    ms, mv, w = moving_average(s, v)
    assert w == 4 and len(ms) == len(mv) == 197 and mv[0] == pytest.approx(1.5)
    assert curves_figure([]) is None and curve_panels([{"step": 1, "split": "train"}]) == []


def test_steps_to_reach_inverts_an_exact_power_law():
    steps = np.arange(1, 21) * 500.0
    acc = 1 - 0.8 * steps ** -0.4  # err = a * step^b
    r = cmp.steps_to_reach(steps, acc, 0.99)
    assert r.slope == pytest.approx(-0.4, abs=1e-9)
    assert r.steps == pytest.approx((0.01 / 0.8) ** (1 / -0.4), rel=1e-6)
    assert r.reached_at is None and r.first_step == 2500 and r.points == 16  # steps >= 10000/4
    assert f"{r.steps:,.0f} steps" in r.text() and "step^-0.40" in r.text()
    # the fit ignores the first quarter: a bad start does not move it
    bad_start = np.where(steps < 2500, 0.1, acc)
    assert cmp.steps_to_reach(steps, bad_start, 0.99).steps == pytest.approx(r.steps, rel=1e-6)


def test_steps_to_reach_already_reached_flat_and_too_few_points():
    steps = np.array([100.0, 200, 300, 400])
    rising = cmp.steps_to_reach(steps, np.array([0.5, 0.7, 0.9, 0.95]), 0.8)
    assert rising.reached_at == 300 and rising.text() == "reached 80.00 % at step 300"
    flat = cmp.steps_to_reach(steps, np.array([0.5, 0.5, 0.49, 0.48]), 0.9)
    assert flat.slope > 0 and flat.steps is None and "does not fall" in flat.text()
    with pytest.raises(ValueError, match="at least 3.*eval_every"):
        cmp.steps_to_reach(steps[:2], np.array([0.5, 0.6]), 0.9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        cmp.steps_to_reach(steps, np.array([0.5, 0.6, 0.7, 0.8]), 90)


def test_compare_reach_reads_each_runs_validation_curve(runs, tmp_path):
    d = _copy(runs[0], tmp_path / "curve")
    records = [{"step": s, "split": "eval", "accuracy": 1 - 0.5 * s ** -0.5} for s in
               (100, 200, 400, 800, 1600)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    c = cmp.compare([d, runs[1]], reach=99.0)
    want = cmp.steps_to_reach([100, 200, 400, 800, 1600], [r["accuracy"] for r in records], 0.99)
    assert c.reach[0] == f"curve: {want.text()}"
    assert want.steps == pytest.approx(2500, rel=1e-6)  # 0.5 / sqrt(2500) = 0.01
    assert c.reach[1].startswith("b: no extrapolation:")  # linreg_sgd logs no accuracy
    assert "Extrapolated from the validation curves:" in c.text()
    with pytest.raises(ValueError, match="in percent"):
        cmp.compare([d], reach=0)

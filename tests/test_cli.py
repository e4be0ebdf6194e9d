"""The `metalearn` command line end to end (list, train, resume, evaluate, errors)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metalearn.cli import main


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "metalearn.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout


def test_list_shows_experiments(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "linreg_sgd" in out and "SGD" in out


def test_train_resume_evaluate(tmp_path, capsys):
    rd = tmp_path / "run"
    sets = ["--set", "steps=20", "--set", "eval_every=10", "--set", "eval_episodes=50",
            "--set", "test_episodes=50", "--set", "checkpoint_every=10"]
    assert main(["train", "linreg_sgd", "--run-dir", str(rd), "--no-progress", *sets]) == 0
    for f in ("config.json", "metrics.jsonl", "summary.json", "plots/learning_curves.png"):
        assert (rd / f).exists(), f
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["test"]["episodes"] == 50 and summary["test"]["loss"] > 0
    assert sorted(p.name for p in (rd / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10", "20"]
    assert main(["train", "--run-dir", str(rd), "--resume", "--no-progress",
                 "--set", "steps=30"]) == 0
    recs = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 31))
    capsys.readouterr()
    assert main(["evaluate", str(rd), "--episodes", "40"]) == 0
    out = capsys.readouterr().out
    assert "test (step 30, 40 episodes)" in out and "loss=" in out
    assert json.loads((rd / "eval_test.json").read_text())["episodes"] == 40
    assert main(["evaluate", str(rd), "--ways", "5"]) == 2  # not a few-shot run
    assert "has no ways/shots/queries/unlabeled settings" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["train", "nope"], "unknown experiment 'nope'"),
    (["train", "linreg_sgd", "--set", "outer.optimizer=adamx"], "unknown optimizer"),
    (["train", "linreg_sgd", "--set", "stepz=1"], "no field 'stepz'"),
    (["evaluate", "/nonexistent/run"], "not a metalearn run directory"),
    (["train", "--resume"], "--resume needs --run-dir"),
])
def test_cli_errors_are_clear(argv, msg, capsys, tmp_path):
    if argv[0] == "train" and "--resume" not in argv:
        argv = [*argv, "--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err

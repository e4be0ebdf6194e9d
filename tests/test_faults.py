"""Runs survive faults and bad input: the CLI end to end, asserting on messages and on files left.

Each case drives `metalearn` as a user would (in-process through `main`, or as a subprocess
where a kill or the interpreter's exit matters) on the small `linreg_sgd` experiment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from metalearn.cli import _message, main
from tests.helpers import needs_omniglot

QUIET = ["--no-progress"]
SMALL = ["--set", "test_episodes=20", "--set", "eval_episodes=20", "--set", "eval_every=0",
         "--set", "outer.steps_per_call=1"]


def train(rd: Path, *sets: str, resume: bool = False) -> int:
    """`metalearn train linreg_sgd` (or `--resume`) in run directory `rd`."""
    head = ["train", "--resume"] if resume else ["train", "linreg_sgd"]
    return main([*head, "--run-dir", str(rd), *QUIET, *SMALL, *sets])


def snapshot(rd: Path) -> dict[str, bytes]:
    """Every file under `rd` with its bytes."""
    return {str(p.relative_to(rd)): p.read_bytes() for p in sorted(rd.rglob("*")) if p.is_file()}


def checkpoints(rd: Path, folder: str = "checkpoints") -> list[int]:
    """Steps of the checkpoints in `rd/folder`."""
    d = rd / folder
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def train_losses(rd: Path) -> list[float]:
    """The training losses logged in `rd`, by step."""
    recs = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(recs, key=lambda r: r["step"]) if r["split"] == "train"]


# plain SGD with a step far too large: the loss grows each step until it overflows (step 11)
DIVERGE = ["--set", "outer.gradient.optimizer=sgd", "--set", "outer.gradient.learning_rate=5",
           "--set", "checkpoint_every=1", "--set", "steps=50"]


def test_nan_stop_keeps_a_good_checkpoint_and_resumes_with_a_lower_rate(tmp_path, capsys):
    rd = tmp_path / "run"
    assert train(rd, *DIVERGE) == 2
    err = capsys.readouterr().err
    assert "training loss became" in err and "resume from it (--resume) with a lower" in err
    assert "outer.gradient.learning_rate=..., now 5" in err and "clip_norm=1.0" in err
    bad = int(err.split("at step ")[1].split(":")[0])
    kept, aside = checkpoints(rd), checkpoints(rd, "rejected_checkpoints")
    # the parameters saved at step t - 1 gave the non-finite loss of step t: set aside, not lost
    assert bad > 3 and max(kept) == bad - 2 and aside == [bad - 1]
    assert f"The last good checkpoint is step {bad - 2}" in err
    assert (rd / "rejected_checkpoints" / f"{bad - 1}.why.txt").exists()
    # the kept checkpoint evaluates to a finite loss, and training goes on from it
    assert main(["evaluate", str(rd), *QUIET]) == 0
    assert np.isfinite(json.loads((rd / "eval_test.json").read_text())["loss"])
    assert train(rd, "--set", "outer.gradient.learning_rate=1e-6", "--set", "steps=30",
                 resume=True) == 0
    losses = train_losses(rd)
    assert len(losses) == 30 and np.all(np.isfinite(losses[bad - 2:]))
    assert json.loads((rd / "config.json").read_text())["outer"]["gradient"][
        "learning_rate"] == 1e-6  # written once the resume succeeded


def test_resume_of_a_finished_run_runs_its_missing_final_evaluation(tmp_path, capsys):
    """A run whose training finished but whose final evaluation did not (a bad report setting,
    an interrupt) is finished by `--resume`: no step trained, the same test figures."""
    rd = tmp_path / "run"
    assert train(rd, "--set", "steps=4", "--set", "checkpoint_every=2") == 0
    summary = json.loads((rd / "summary.json").read_text())
    losses = train_losses(rd)
    (rd / "summary.json").unlink()  # as if stopped during the final test
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(rd), *SMALL]) == 0
    assert "training finished at step 4: running the final evaluation only" in \
        capsys.readouterr().out
    again = json.loads((rd / "summary.json").read_text())
    assert again["test"] == summary["test"] and train_losses(rd) == losses
    assert again["steps_per_second"] == "nan"  # unknown: its summary was lost
    assert train(rd, "--set", "steps=4", "--set", "test_episodes=30", resume=True) == 0
    third = json.loads((rd / "summary.json").read_text())
    assert third["test"]["episodes"] == 30 and third["steps_per_second"] == "nan"


def test_resume_with_other_shapes_is_not_called_corrupt(tmp_path, capsys):
    """An override that changes the meta-parameters' shapes: a message of its own, and no
    advice to resume from an older checkpoint (which would set the healthy newest aside)."""
    rd = tmp_path / "run"
    assert train(rd, "--set", "steps=4", "--set", "checkpoint_every=2") == 0
    before = snapshot(rd)
    capsys.readouterr()
    assert train(rd, "--set", "task.dim=7", "--set", "steps=6", resume=True) == 2
    err = capsys.readouterr().err
    assert "is intact but holds an array" in err and "where this run expects" in err, err
    assert "corrupt" not in err and "--from-step" not in err
    assert snapshot(rd) == before
    assert train(rd, "--set", "steps=6", resume=True) == 0  # without the override it goes on


def test_nan_hint_never_advises_what_is_in_force(tmp_path, capsys):
    assert train(tmp_path / "r", *DIVERGE, "--set", "outer.gradient.clip_norm=1e30") == 2
    err = capsys.readouterr().err
    assert "tighter gradient clipping (--set outer.gradient.clip_norm=..., now 1e+30)" in err
    assert "clip_norm=1.0" not in err


def test_failed_resume_changes_nothing(tmp_path, capsys):
    rd = tmp_path / "run"
    assert train(rd, "--set", "steps=4", "--set", "checkpoint_every=2") == 0
    before = snapshot(rd)
    assert train(rd, "--set", "steps=3", resume=True) == 2  # already at step 4
    assert "already at step 4" in capsys.readouterr().err
    assert train(rd, "--set", "outer.gradient.optimizer=adamx", resume=True) == 2
    assert train(rd, "--set", "learner.first_order=maybe", resume=True) == 2
    assert "--set learner.first_order=maybe: expected true/false" in capsys.readouterr().err
    assert snapshot(rd) == before
    # a resume that fails while training leaves config.json as it was: a plain resume after it
    # trains with the run's own settings, not those of the failed attempt
    assert train(rd, *DIVERGE, resume=True) == 2
    assert (rd / "config.json").read_bytes() == before["config.json"]
    assert train(rd, "--set", "steps=8", resume=True) == 0
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["outer"]["gradient"]["learning_rate"] == 3e-3 and cfg["steps"] == 8


def test_a_used_run_directory_is_refused_not_mixed(tmp_path, capsys):
    rd = tmp_path / "run"
    assert train(rd, *DIVERGE[:4], "--set", "steps=20") == 2  # stops with no checkpoint
    assert checkpoints(rd) == [] and (rd / "metrics.jsonl").exists()
    before = snapshot(rd)
    assert train(rd, "--set", "steps=4") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "choose a new run directory (--run-dir DIR)" in err
    assert snapshot(rd) == before
    assert train(rd, "--set", "steps=4", resume=True) == 2  # nothing to resume from
    assert "no checkpoint" in capsys.readouterr().err and snapshot(rd) == before


def test_read_only_commands_create_nothing(tmp_path, capsys):
    gone = tmp_path / "no" / "such" / "run"
    assert main(["evaluate", str(gone), *QUIET]) == 2
    assert main(["train", "--resume", "--run-dir", str(gone), *QUIET]) == 2
    assert main(["compare", str(gone), "--no-save"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_corrupt_newest_checkpoint_resume_from_an_older_step(tmp_path, capsys):
    rd, ref = tmp_path / "run", tmp_path / "ref"
    assert train(rd, "--set", "steps=6", "--set", "checkpoint_every=2") == 0
    assert checkpoints(rd) == [2, 4, 6]
    for f in (rd / "checkpoints" / "6").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert train(rd, "--set", "steps=8", resume=True) == 2
    err = capsys.readouterr().err
    assert "could not be read" in err and f"--run-dir {rd.absolute()} --resume --from-step 4" in err
    assert train(rd, "--set", "steps=8", "--from-step", "4", resume=True) == 0
    assert checkpoints(rd, "rejected_checkpoints") == [6] and max(checkpoints(rd)) == 8
    assert train(ref, "--set", "steps=8", "--set", "checkpoint_every=2") == 0
    assert train_losses(rd) == train_losses(ref)  # the resumed run is the uninterrupted one
    assert main(["train", "linreg_sgd", "--from-step", "2", "--run-dir", str(tmp_path / "x"),
                 *QUIET]) == 2
    assert "--from-step N goes with --resume" in capsys.readouterr().err


def test_internal_errors_are_not_a_bare_key():
    assert "internal error: KeyError('test')" in _message(KeyError("test"))
    assert _message(KeyError("--set x: no field 'x'")) == "--set x: no field 'x'"


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metalearn.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_kill_mid_run_then_resume_is_exact(tmp_path):
    rd, ref = tmp_path / "run", tmp_path / "ref"
    args = ["train", "linreg_sgd", *QUIET, *SMALL, "--set", "steps=3000", "--set",
            "checkpoint_every=100"]
    proc = subprocess.Popen([sys.executable, "-m", "metalearn.cli", *args, "--run-dir", str(rd)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(checkpoints(rd)) < 2 and time.time() - t0 < 180 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoints(rd) and not (rd / "summary.json").exists()
    out = _cli("train", "--resume", "--run-dir", str(rd), *QUIET)
    assert out.returncode == 0, out.stderr
    assert _cli(*args, "--run-dir", str(ref)).returncode == 0
    assert train_losses(rd) == train_losses(ref)


@pytest.mark.slow  # 15 s: a real run in a subprocess, interrupted and resumed
def test_ctrl_c_prints_one_line_with_the_resume_command_and_loses_nothing(tmp_path):
    """SIGINT to a real run: exit 130, one line naming the step, the last checkpoint and the
    command that continues; the run then resumes and finishes."""
    rd = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "metalearn.cli", "train", "linreg_sgd", *QUIET,
                             *SMALL, "--set", "steps=100000", "--set", "checkpoint_every=50",
                             "--run-dir", str(rd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while len(checkpoints(rd)) < 2 and time.time() - t0 < 180 and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    last = checkpoints(rd)[-1]
    assert lines[0].startswith("metalearn: interrupted at step ")
    assert f"its last checkpoint is step {last}" in lines[0]
    assert f"continue with `metalearn train --run-dir {rd} --resume`" in lines[0]
    out = _cli("train", "--resume", "--run-dir", str(rd), *QUIET, "--set", f"steps={last + 5}")
    assert out.returncode == 0, out.stderr
    assert len(train_losses(rd)) == last + 5
@pytest.mark.slow  # compiling-heavy; the default suite keeps under 10 min


def test_error_paths_print_one_line_and_no_traceback(tmp_path):
    rd = tmp_path / "run"
    assert train(rd, "--set", "steps=2", "--set", "checkpoint_every=1") == 0
    # error paths print one line, no traceback (no orbax "Event loop is closed" at exit)
    for bad in (["train", "--resume", "--run-dir", str(rd), "--set", "steps=1", *QUIET],
                ["train", "linreg_sgd", "--run-dir", str(tmp_path / "nan"), *QUIET, *SMALL,
                 *DIVERGE]):
        out = _cli(*bad)
        assert out.returncode == 2 and out.stderr.startswith("metalearn: error:"), out.stderr
        assert "Traceback" not in out.stderr and "Event loop" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.slow
@needs_omniglot
def test_an_experiment_without_a_test_split_runs_end_to_end(tmp_path, capsys):
    rd = tmp_path / "run"
    assert main(["train", "protonet_omniglot", "--run-dir", str(rd), *QUIET,
                 "--set", "steps=2", "--set", "learner.channels=4", "--set", "task.ways=5",
                 "--set", "task.eval_ways=0", "--set", "task.queries=2",
                 "--set", "task.eval_queries=2", "--set", "data.protocol=minimal",
                 "--set", "data.train_alphabets=Balinese,Korean",
                 "--set", "data.validation_alphabets=Greek", "--set", "eval_episodes=2",
                 "--set", "checkpoint_every=0"]) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert "validation" in summary and "test" not in summary
    assert main(["evaluate", str(rd), "--split", "test", *QUIET]) == 2
    assert "split 'test' not available" in capsys.readouterr().err
    assert main(["evaluate", str(rd), "--episodes", "2", *QUIET]) == 0  # default: validation
    assert capsys.readouterr().out.startswith("validation (step 2, 2 episodes")

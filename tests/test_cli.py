"""The `metalearn` command line end to end (list, train, resume, evaluate, errors)."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest

from metalearn.cli import hugepages_env, main
from metalearn.config import apply_overrides
from metalearn.experiment import Experiment


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "metalearn.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "evaluate" in out.stdout


def test_the_command_advises_huge_pages_only_where_that_changes_something():
    """The `metalearn` command re-runs itself with glibc's malloc on transparent huge pages
    when the kernel only gives them on request; never twice, never against the user's say."""
    madvise = "always [madvise] never\n"
    env = hugepages_env({"PATH": "/bin"}, madvise)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, madvise) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}
    for environ, mode in [(env, madvise), ({"METALEARN_HUGEPAGES": "0"}, madvise),
                          ({}, "[always] madvise never\n"), ({}, "always madvise [never]\n"),
                          ({}, None)]:
        assert hugepages_env(environ, mode) is None


def test_list_shows_experiments(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "linreg_sgd" in out and "SGD" in out


def test_train_resume_evaluate(tmp_path, capsys):
    """train says where it writes, resume where it resumes from; evaluate repeats the test."""
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
    assert f"run directory: {rd}" in capsys.readouterr().out
    config = json.loads((rd / "config.json").read_text())
    assert "evolution" not in config["outer"]  # a run's config holds what it uses
    assert main(["train", "--run-dir", str(rd), "--resume", "--set", "steps=30"]) == 0
    assert "resuming from step 20 of 30" in capsys.readouterr().out
    recs = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 31))
    assert main(["evaluate", str(rd), "--episodes", "40", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "test (step 30, 40 episodes, seed 0)" in out and "loss=" in out
    assert json.loads((rd / "eval_test.json").read_text())["episodes"] == 40
    # by default `evaluate` repeats the test figures of the run's summary exactly
    assert main(["evaluate", str(rd), "--no-progress"]) == 0
    summary = json.loads((rd / "summary.json").read_text())
    assert json.loads((rd / "eval_test.json").read_text())["loss"] == summary["test"]["loss"]
    assert main(["evaluate", str(rd), "--ways", "5"]) == 2  # not a few-shot run
    assert "has no episode settings to change (asked for ['ways'])" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["train", "nope"], "unknown experiment 'nope'"),
    (["train", "linreg_sgd", "--set", "outer.gradient.optimizer=adamx"], "unknown optimizer"),
    (["train", "linreg_sgd", "--set", "outer.optimizer=adam"],
     "did you mean outer.gradient.optimizer?"),
    (["train", "linreg_sgd", "--set", "outer.kind=evolution", "--set",
      "outer.gradient.learning_rate=0.1"], "outer.kind=evolution, which reads outer.evolution.*"),
    (["train", "linreg_sgd", "--set", "outer.kind=evolution", "--set",
      "outer.evolution.learning_rate=0.1"], "Sep_CMA_ES has no learning rate"),
    (["train", "linreg_sgd", "--set", "stepz=1"], "no field 'stepz'"),
    (["evaluate", "/nonexistent/run"], "does not exist or is not a directory"),
    (["train", "--resume"], "--resume needs --run-dir"),
])
def test_cli_errors_are_clear(argv, msg, capsys, tmp_path):
    if argv[0] == "train" and "--resume" not in argv:
        argv = [*argv, "--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_config_lists_and_describes_every_field(capsys):
    from metalearn.config import describe_config, field_docs
    from metalearn.discovery import list_experiments, load_module

    for name, _ in list_experiments():
        mod = load_module(name)
        missing = [n for n, _, doc in describe_config(mod.get_config(), field_docs(mod))
                   if not doc]
        assert not missing, f"{name}: config fields without a description: {missing}"
    assert main(["config", "maml_omniglot", "--set", "learner.inner_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "learner.inner_steps" in out and "inner SGD steps" in out
    line = next(x for x in out.splitlines() if x.startswith("learner.inner_steps "))
    assert line.split()[1] == "3"
    assert "outer.gradient.learning_rate" in out and "outer.evolution.strategy" in out


def test_a_run_made_from_python_without_an_eval_sampler_names_its_splits(tmp_path, capsys):
    from metalearn.learners.gd import GradientDescent
    from metalearn.outer.driver import RunOptions
    from metalearn.outer.gradient import GradientOuterLoop
    from metalearn.tasks.regression import LinearRegression

    GradientOuterLoop(batch_size=2).run(GradientDescent(), LinearRegression(dim=2, num_context=4),
                                        jax.random.PRNGKey(0), steps=2, run_dir=tmp_path,
                                        options=RunOptions(progress=False))
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no held-out split to evaluate (its splits: ['train']); choose one (--split NAME)" \
        in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--split", "train", "--episodes", "10"]) == 0
    assert "train (step 2, 10 episodes" in capsys.readouterr().out


def test_small_output_defects_stay_fixed(tmp_path, capsys):
    """`compare --help` shows 95% (not 95%%); one episode shows no "± nan"; a run with progress
    names its run directory once."""
    from metalearn.evaluation import format_metrics

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "95% CI" in " ".join(out.split()) and "%%" not in out
    assert format_metrics({"loss": 0.5, "loss_ci95": float("nan"), "episodes": 1}) == \
        "loss=0.5000"
    rd = tmp_path / "run"
    assert main(["train", "linreg_sgd", "--run-dir", str(rd), "--set", "steps=2",
                 "--set", "test_episodes=4", "--set", "eval_every=0"]) == 0
    assert capsys.readouterr().out.count("run directory:") == 1


def test_evaluate_with_other_inner_steps_scores_the_learner_with_that_many(tmp_path, capsys):
    """`--inner-steps N` is the run's learner with inner_steps=N (here MAML on linear
    regression), scored on the run's test episodes and saved apart; 0 and a learner without
    inner steps are refused, naming the fix."""
    import dataclasses

    from metalearn.evaluation import evaluate
    from metalearn.reload import evaluate_run, load_run
    from metalearn.seeds import TEST_SEED

    rd = tmp_path / "run"
    assert main(["train", "linreg_sgd", "--run-dir", str(rd), "--set", "steps=2",
                 "--set", "test_episodes=8", "--set", "eval_every=0", "--no-progress"]) == 0
    loaded = load_run(rd)
    res = evaluate_run(rd, inner_steps=7)
    want = evaluate(dataclasses.replace(loaded.evaluator, inner_steps=7), loaded.meta,
                    loaded.splits["test"], jax.random.PRNGKey(TEST_SEED), 8)
    assert res["inner_steps"] == 7 and res["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert res["loss"] != pytest.approx(evaluate_run(rd)["loss"], rel=1e-5)
    assert (rd / "eval_test_steps7.json").exists()
    capsys.readouterr()
    assert main(["evaluate", str(rd), "--inner-steps", "7", "--no-progress"]) == 0
    assert "7 inner steps" in capsys.readouterr().out
    assert main(["evaluate", str(rd), "--inner-steps", "0"]) == 2
    assert "inner_steps=0: must be at least 1" in capsys.readouterr().err
    from metalearn.learners.protonet import ProtoNet
    from metalearn.reload import _with_inner_steps

    with pytest.raises(ValueError, match="takes no inner steps .* without --inner-steps"):
        _with_inner_steps(ProtoNet(), 5, "runs/x")


@pytest.mark.parametrize("flag,value", [("episodes", "0"), ("ways", "0"), ("shots", "-1"),
                                        ("unlabeled", "-2")])
def test_evaluate_refuses_impossible_counts_before_reading_the_run(tmp_path, capsys, flag,
                                                                    value):
    """`--episodes 0` once meant the run's 1,000; now every count is checked first, even for a
    run directory that does not exist (nothing is read before the check)."""
    assert main(["evaluate", str(tmp_path / "nothing-here"), f"--{flag}", value]) == 2
    assert f"--{flag} {value}: must be at least" in capsys.readouterr().err


@pytest.mark.slow  # two runs; the notice is timing-driven, the message is what is checked
def test_a_slow_compilation_says_so(tmp_path, capsys, monkeypatch):
    """A compilation longer than COMPILE_NOTICE_S prints what it compiles and then its time
    (here the threshold is 0 s); with --no-progress nothing is said."""
    from metalearn.outer import driver

    monkeypatch.setattr(driver, "COMPILE_NOTICE_S", 0.0)
    assert main(["train", "linreg_sgd", "--run-dir", str(tmp_path / "a"), "--set", "steps=2",
                 "--set", "test_episodes=4", "--set", "eval_every=0"]) == 0
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "compiling the meta-step (2 steps a call) ..." in said
    assert "compiling the meta-step (2 steps a call): done in" in said
    assert main(["train", "linreg_sgd", "--run-dir", str(tmp_path / "b"), "--set", "steps=2",
                 "--set", "test_episodes=4", "--set", "eval_every=0", "--no-progress"]) == 0
    assert "compiling" not in capsys.readouterr().out


def test_the_final_evaluation_says_how_many_episodes_come(tmp_path, capsys):
    """Before the final test and report run, one line says how many episodes they hold."""
    from metalearn.experiments import _hebbian, _omniglot, protonet_omniglot
    from metalearn.experiments import lopt_omniglot as lopt
    from metalearn.training import final_episodes

    def exp(plan):  # the parts of an Experiment that final_episodes reads
        return Experiment(learner=None, splits={"train": None, "test": None},
                          report=lambda *a, **k: {}, report_plan=plan)

    config = protonet_omniglot.get_config()
    assert final_episodes(config, exp(_omniglot.report_plan)) == (
        "final evaluation: test 1000 episodes + report 3 settings x 1000 episodes (4000 "
        "episodes)")
    config = lopt.get_config()
    assert final_episodes(config, exp(_hebbian.report_plan)) == (
        "final evaluation: test 1000 episodes + report 3 curves x 1000 test episodes + SGD/Adam "
        "tuning 2 x 9 rates x 500 training episodes (13000 episodes)")
    apply_overrides(config, ["report_dataset=sklearn:digits"])
    assert _hebbian.report_plan(config) == (
        "report 3 curves x 1000 test episodes and 3 x 1000 of sklearn:digits + SGD/Adam tuning "
        "2 x 9 rates x 500 training episodes", 15000)
    from metalearn.experiments import cht_omniglot as cht
    config = cht.get_config()
    assert cht.report_plan(config) == (
        "report 2 learners x 500 sequences of 10 tasks + 500 of one task in 10 mini-batches",
        2000)
    apply_overrides(config, ["report_independent=false", "report_minibatches=false"])
    assert cht.report_plan(config)[1] == 500
    assert main(["train", "linreg_sgd", "--run-dir", str(tmp_path / "a"), "--set", "steps=2",
                 "--set", "test_episodes=4", "--set", "eval_every=0"]) == 0
    assert "final evaluation: test 4 episodes (4 episodes)" in capsys.readouterr().out


def test_misspelt_names_get_a_did_you_mean_and_failed_checks_leave_no_directory(tmp_path,
                                                                                capsys):
    assert main(["train", "protonet_omniglt"]) == 2
    assert "unknown experiment 'protonet_omniglt' (did you mean protonet_omniglot?)" in \
        capsys.readouterr().err
    assert main(["config", "linreg_sgd", "--set", "stpes=3"]) == 2
    assert "no field 'stpes' (did you mean steps?)" in capsys.readouterr().err
    rd = tmp_path / "never"
    assert main(["train", "protonet_omniglot", "--run-dir", str(rd), "--no-progress",
                 "--set", "data.protocol=minimal", "--set", "report_settings=20x1"]) == 2
    assert "report setting '20x1'" in capsys.readouterr().err
    assert not rd.exists()


def test_quick_mode_is_a_short_run_and_a_long_run_says_so(tmp_path, capsys, monkeypatch):
    """--quick: 20 steps, 20 final episodes, the experiment's QUICK overrides, --set on top,
    refused with --resume; a run whose remaining steps would outlast LONG_RUN_S says so once,
    naming --quick (here the threshold is 0 s)."""
    from metalearn.outer import driver
    from metalearn.training import quick_sets

    monkeypatch.setattr(driver, "LONG_RUN_S", 0.0)
    rd = tmp_path / "q"
    assert main(["train", "linreg_sgd", "--quick", "--set", "steps=12", "--set",
                 "outer.steps_per_call=4",
                 "--run-dir", str(rd)]) == 0
    config = json.loads((rd / "config.json").read_text())
    assert (config["steps"], config["test_episodes"], config["eval_every"]) == (12, 20, 0)
    out = capsys.readouterr()
    said = out.out + out.err
    assert said.count("s a step on this machine") == 1
    assert "for a smoke run use --quick, or train fewer steps (--set steps=N)" in said
    assert main(["train", "--run-dir", str(rd), "--resume", "--quick"]) == 2
    assert "--quick starts a new run" in capsys.readouterr().err
    from metalearn.experiments import hebbian_2d

    sets = quick_sets(hebbian_2d.get_config(), hebbian_2d)
    assert "steps=20" in sets and "tune_episodes=20" in sets and "report_episodes=20" in sets


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error():
    """`metalearn config NAME | head -1`: no traceback, exit status 0."""
    out = subprocess.run("metalearn config linreg_sgd | head -1; exit ${PIPESTATUS[0]}",
                         shell=True, executable="/bin/bash", capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("linreg_sgd: ")

"""Research scripting: experiments outside the package, runs made from Python, user optax and
evosax objects, the deployed loss in both loops, label checks, errors in the caller's terms,
and the guide's "Write your own" example (docs/guide.md), run as written."""

from __future__ import annotations

import json
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from evosax.algorithms import SNES

import metalearn as ml
from metalearn.cli import main
from metalearn.core import batch_loss, query_loss
from metalearn.discovery import list_experiments, resolve_experiment
from metalearn.learners.maml import MAML
from metalearn.learners.protonet import ProtoNet
from metalearn.nn import MLP, Linear
from metalearn.reload import load_run
from metalearn.specs import NotRebuildable, object_spec, rebuild
from metalearn.tasks.regression import LinearRegression
from metalearn.training import train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
QUICK = ["steps=20", "eval_every=10", "eval_episodes=50", "test_episodes=100",
         "eval_batch_size=50"]


@pytest.fixture
def blobs(monkeypatch):
    """The example's module (Blobs sampler, RidgeProbe learner), imported as a user would."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import ridge_probe

    return ridge_probe


def _readme_section() -> str:
    """The "Write your own" section of the guide the README links to."""
    text = (ROOT / "docs" / "guide.md").read_text()
    start = text.index("## Write your own")
    end = text.index("\n## ", start + 3)
    return text[start:end]


def _readme_commands(kind: str) -> list[list[str]]:
    """The guide's example's commands that start with `kind` (metalearn, python), as argv."""
    blocks = re.findall(r"```bash\n(.*?)```", _readme_section(), re.S)
    lines = [line.split("#")[0].strip() for b in blocks for line in b.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith(kind + " ")]


def test_readme_example_code_is_the_example_files():
    """Every Python block of the guide's example is in examples/, as written there."""
    sources = "".join(p.read_text() for p in EXAMPLES.glob("*.py"))
    blocks = re.findall(r"```python\n(.*?)```", _readme_section(), re.S)
    assert len(blocks) >= 3
    for block in blocks:
        assert block.strip() in sources, f"guide code not in examples/: {block[:80]!r}"


def test_readme_example_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """The guide's example's metalearn commands run (20 steps): trains with both loops,
    evaluates and compares from the CLI."""
    commands = _readme_commands("metalearn")
    assert [c[1] for c in commands] == ["train", "train", "evaluate", "compare"]
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        extra = [a for s in QUICK for a in ("--set", s)] + ["--no-progress"] \
            if argv[1] == "train" else []
        assert main([*argv[1:], *extra]) == 0, argv
    out = capsys.readouterr().out
    for run in ("ridge-gd", "ridge-es"):
        summary = json.loads((tmp_path / "runs" / run / "summary.json").read_text())
        assert summary["test"]["accuracy"] > 0.6, (run, summary["test"])  # chance: 1/3
    assert "| ridge-gd" in out and "| ridge-es" in out  # the compare table


@pytest.mark.slow  # 20 s: its parts (user optax/evosax objects, load_run) are tested above
def test_readme_example_python_script_runs(tmp_path, monkeypatch, capsys):
    """The guide's example's Python script trains with both loops and reloads its runs."""
    [argv] = _readme_commands("python")
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [argv[1], "runs", "20"])
    monkeypatch.syspath_prepend(str(tmp_path / "examples"))
    runpy.run_path(argv[1], run_name="__main__")
    out = capsys.readouterr().out
    assert re.search(r"py-gd: step 20, accuracy=0\.\d+", out)
    assert re.search(r"py-es: step 20, accuracy=0\.\d+", out)


@pytest.mark.slow  # two trainings and a resume
def test_experiment_by_module_and_by_entry_point(tmp_path, monkeypatch):
    """A package's experiment is found by module path and by its registered name; its runs
    record the module, so that resume and evaluate find it again."""
    pkg = tmp_path / "mystudy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(EXAMPLES / "ridge_probe.py", pkg / "blobs.py")
    dist = tmp_path / "mystudy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mystudy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[metalearn.experiments]\nblobs = mystudy.blobs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_experiment("blobs") == ("blobs", "mystudy.blobs")
    assert resolve_experiment("mystudy.blobs") == ("blobs", "mystudy.blobs")
    assert dict(list_experiments())["blobs"].startswith("Ridge probe on 2-D blobs")
    run_dir = tmp_path / "runs" / "b"
    train("blobs", [*QUICK[1:], "steps=4", "checkpoint_every=2"], run_dir=run_dir,
          progress=False)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["experiment"], config["experiment_source"]) == ("blobs", "mystudy.blobs")
    _, summary = train("", ["steps=6"], run_dir=run_dir, resume=True, progress=False)
    assert summary["steps"] == 6 and load_run(run_dir).step == 6
    with pytest.raises(ValueError, match="unknown experiment 'nope'.*mypkg.my_exp"):
        resolve_experiment("nope")
    with pytest.raises(FileNotFoundError, match="experiment file missing.py does not exist"):
        resolve_experiment("missing.py")


def test_python_run_reloads_and_evaluates_from_python_and_the_cli(tmp_path, capsys):
    """A run made with OuterLoop.run is a full run: config.json, summary.json, load_run with
    nothing passed, `metalearn evaluate` with the same figures, and resume."""
    learner = MAML(Linear(), inner_steps=2, inner_lr=0.1)
    task = LinearRegression(dim=3, num_context=6, num_queries=4)
    outer = ml.GradientOuterLoop(learning_rate=0.01, batch_size=8, steps_per_call=3)
    run_dir = tmp_path / "py"
    result = outer.run(learner, task, jax.random.PRNGKey(7), steps=6, eval_sampler=task,
                       run_dir=run_dir, options=ml.RunOptions(progress=False,
                                                              eval_episodes=64))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["experiment"] is None and summary["steps"] == 6
    assert summary["eval"]["loss"] == pytest.approx(result.final_eval["loss"])
    loaded = load_run(run_dir)
    assert loaded.learner == learner and loaded.splits["eval"] == task and loaded.step == 6
    for a, b in zip(jax.tree.leaves(loaded.meta), jax.tree.leaves(result.meta), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    figures = loaded.evaluate()
    assert main(["evaluate", str(run_dir), "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert printed["split"] == "eval" and printed["loss"] == pytest.approx(figures["loss"])
    again = outer.run(learner, task, jax.random.PRNGKey(7), steps=9, run_dir=run_dir,
                      resume=True, options=ml.RunOptions(progress=False))
    assert int(again.state.step) == 9
    assert json.loads((run_dir / "config.json").read_text())["steps"] == 9


def test_python_run_names_what_to_pass_when_it_cannot_be_rebuilt(tmp_path, capsys):
    """A learner class of a script and a user optax object are named, with the argument."""
    learner = MAML(Linear(), inner_steps=1)
    task = LinearRegression(dim=2, num_context=4)
    outer = ml.GradientOuterLoop(optimizer=optax.sgd(0.01), batch_size=4)
    run_dir = tmp_path / "custom"
    outer.run(learner, task, jax.random.PRNGKey(0), steps=2, run_dir=run_dir,
              options=ml.RunOptions(progress=False))
    with pytest.raises(ValueError, match=r"outer loop cannot be rebuilt.*optax.*outer=\.\.\."):
        load_run(run_dir)
    assert load_run(run_dir, outer=outer).step == 2
    config = json.loads((run_dir / "config.json").read_text())
    config["learner"]["type"] = "__main__.MyLearner"
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"__main__.MyLearner \(defined in a script.*learner="):
        load_run(run_dir, outer=outer)
    assert load_run(run_dir, learner=learner, outer=outer).step == 2
    assert main(["evaluate", str(run_dir), "--no-progress"]) == 2
    assert "the command line cannot" in capsys.readouterr().err


def test_specs_round_trip_and_refuse_what_json_cannot_hold():
    """Frozen-dataclass learners and samplers come back equal; arrays are refused by name."""
    for obj in (MAML(MLP((8, 4), out_dim=2), inner_steps=3, lr_mode="per_param"),
                ProtoNet(embedding=MLP((8,), out_dim=4)), LinearRegression(dim=3)):
        assert rebuild(json.loads(json.dumps(object_spec(obj)))) == obj
    with pytest.raises(NotRebuildable, match="jaxlib.*ArrayImpl"):
        rebuild(object_spec({"x": jnp.zeros(2)}))
@pytest.mark.slow  # compiling-heavy; the default suite keeps under 10 min


def test_user_optax_and_evosax_objects_equal_their_named_forms(blobs):
    """A user optax object gives the numbers of the named optimizer it equals; an SNES
    instance with std_init in its params those of strategy='SNES'; misuse is refused by field."""
    learner = MAML(Linear(), inner_steps=1, inner_lr=0.1)
    task, key = LinearRegression(dim=3, num_context=6, num_queries=4), jax.random.PRNGKey(3)
    opts = ml.RunOptions(progress=False)

    def meta(outer):
        return outer.run(learner, task, key, steps=3, options=opts).meta

    def close(a, b):  # the same program up to XLA's constant folding
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)

    named_loop = ml.GradientOuterLoop(optimizer="sgd", learning_rate=0.05, batch_size=4,
                                      steps_per_call=3)
    named = meta(named_loop)
    jax.tree.map(np.testing.assert_array_equal, named, meta(ml.GradientOuterLoop(
        optimizer=named_loop.tx(), batch_size=4, steps_per_call=3)))
    close(named, meta(ml.GradientOuterLoop(optimizer=optax.sgd(0.05), batch_size=4,
                                           steps_per_call=3)))  # a float rate, no schedule
    snes = SNES(population_size=8, solution=learner.init(key, task.example()))
    close(meta(ml.EvolutionOuterLoop(strategy="SNES", population_size=8, std_init=0.2,
                                     batch_size=4, steps_per_call=3)),
          meta(ml.EvolutionOuterLoop(strategy=snes, strategy_params=snes.default_params.replace(
              std_init=jnp.float32(0.2)), batch_size=4, steps_per_call=3)))
    with pytest.raises(ValueError, match="schedule set, but the optimizer is an optax object"):
        ml.GradientOuterLoop(optimizer=optax.sgd(0.1), schedule="cosine")
    with pytest.raises(ValueError, match="built with population_size=8"):
        ml.EvolutionOuterLoop(strategy=snes, population_size=16)
    with pytest.raises(ValueError, match="std_init set, but the strategy is an evosax object"):
        ml.EvolutionOuterLoop(strategy=snes, std_init=0.5)
    other = ml.EvolutionOuterLoop(strategy=SNES(population_size=8, solution=jnp.zeros(3)))
    with pytest.raises(ValueError, match="build it with solution=learner.init"):
        other.init(learner, task, key)


def test_evolution_logs_the_loss_of_the_deployed_mean():
    """`loss` is the strategy mean's batch loss (as the gradient loop logs its parameters');
    the best member's is `best_member_loss`."""
    learner = MAML(Linear(), inner_steps=1, inner_lr=0.1)
    task = LinearRegression(dim=3, num_context=6, num_queries=4)
    outer = ml.EvolutionOuterLoop(population_size=6, batch_size=5)
    state = outer.init(learner, task, jax.random.PRNGKey(0))
    _, metrics = jax.jit(lambda s: outer.step(learner, task, s))(state)
    _, k_sample, k_loss, _ = jax.random.split(jax.random.fold_in(state.key, state.step), 4)
    loss, _ = batch_loss(learner, outer.meta_params(state), task.sample_batch(k_sample, 5),
                         k_loss)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    assert metrics["best_member_loss"] <= metrics["fitness_mean"]


def test_labels_beyond_the_logits_and_float_labels_get_named(blobs):
    """5-way episodes on a 3-logit learner stop before training; float labels under logits
    are told to be integers."""
    learner = blobs.RidgeProbe(ways=3)
    with pytest.raises(ValueError, match=r"go up to 4 \(5 classes\) but RidgeProbe predicts 3"):
        ml.GradientOuterLoop().run(learner, blobs.Blobs(ways=5), jax.random.PRNGKey(0), steps=1,
                                   options=ml.RunOptions(progress=False))
    meta = learner.init(jax.random.PRNGKey(0), blobs.Blobs().example())
    with pytest.raises(ValueError, match="3 logit columns"):
        ml.evaluate(learner, meta, blobs.Blobs(ways=4), jax.random.PRNGKey(0), episodes=2)
    with pytest.raises(ValueError, match="use integer labels"):
        query_loss(jnp.zeros((4, 3)), jnp.arange(4.0))
    with pytest.raises(ValueError, match="go up to 3"):
        query_loss(jnp.zeros((4, 3)), jnp.arange(4))


def test_errors_name_arguments_in_python_and_flags_on_the_command_line(tmp_path, capsys):
    """The same mistake is told as `from_step=N` / `resume=True` to Python and as
    `--from-step N` / `--resume` on the command line."""
    with pytest.raises(ValueError) as e:
        train("linreg_sgd", run_dir=tmp_path / "r", from_step=3)
    assert "from_step=N goes with resume=True" in str(e.value) and "--" not in str(e.value)
    assert main(["train", "linreg_sgd", "--run-dir", str(tmp_path / "r"), "--from-step",
                 "3"]) == 2
    assert "--from-step N goes with --resume" in capsys.readouterr().err
    with pytest.raises(KeyError, match="sets entry 'outer.clip_norm'.*outer.gradient.clip_norm"):
        train("linreg_sgd", ["outer.clip_norm=1"], run_dir=tmp_path / "r")
    err = ml.NonFiniteLossError(5, float("nan"), 4, remedy=ml.GradientOuterLoop().remedy())
    assert "resume=True" in str(err) and "learning_rate=..., now 0.001" in str(err)


def test_protonet_on_an_mlp_embedding_is_the_prototype_formula(blobs):
    """logits_c(x) = -||f(x) - mean_{y_i = c} f(x_i)||^2 with f the MLP, on vector data."""
    net = MLP((16,), out_dim=8)
    learner = ProtoNet(embedding=net)
    ep = blobs.Blobs(ways=3, shots=4).example()
    meta = learner.init(jax.random.PRNGKey(0), ep)
    assert set(meta) == {"embedding"}
    logits = learner.predict(meta, learner.adapt(meta, ep.support(), None), ep.query_x)
    f = lambda x: np.asarray(net.apply(meta["embedding"], x)[0])  # noqa: E731
    protos = np.stack([f(ep.support_x)[np.asarray(ep.support_y) == c].mean(0) for c in range(3)])
    want = -((f(ep.query_x)[:, None] - protos[None]) ** 2).sum(-1)
    np.testing.assert_allclose(np.asarray(logits)[:, :3], want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"give an embedding model.*ProtoNet\(embedding=MLP"):
        ProtoNet().init(jax.random.PRNGKey(0), ep)


@pytest.mark.slow  # 30-60 s: a ProtoNet run, its reload and CLI evaluation
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "omniglot" /
                         "images_background_small1.zip").exists(),
                    reason="minimal Omniglot zips not found")
def test_readme_from_python_runs_and_is_evaluated_from_the_command_line(tmp_path, monkeypatch,
                                                                        capsys):
    """The README's "From Python" block as written (4 steps instead of 500), then `metalearn
    evaluate` on its run: the FewShotSampler is rebuilt from config.json by reading the images
    again, and scores what `load_run(...).evaluate()` does."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## From Python")
    block = re.findall(r"```python\n(.*?)```", text[start:], re.S)[0]
    assert "steps=500" in block and "eval_every=100" in block
    block = block.replace("steps=500", "steps=4").replace("eval_every=100", "eval_every=2")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own code
    assert (tmp_path / "episode.png").exists()
    capsys.readouterr()
    assert main(["evaluate", "runs/mine", "--episodes", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "runs" / "mine" / "eval_eval.json").read_text())
    again = load_run("runs/mine").evaluate(episodes=20)
    assert res["accuracy"] == pytest.approx(again["accuracy"], abs=1e-9), out
    loaded = load_run("runs/mine")
    assert loaded.splits["eval"].dataset.name == "omniglot:test"
    # per-split samplers given to load_run replace or add splits; test is the default one
    five = loaded.splits["eval"].replace(ways=5)
    with_test = load_run("runs/mine", samplers={"test": five})
    assert with_test.default_split == "test"
    assert with_test.evaluate(episodes=10)["episodes"] == 10

"""Prototypical networks: logits, invariances, soft k-means, the Omniglot experiment end to end."""

from __future__ import annotations

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn import nn
from metalearn.core import Episode, Support
from metalearn.learners.protonet import MASKED_LOGIT, ProtoNet
from metalearn.seeds import MANIFEST_SEED
from tests.helpers import MINIMAL_NO_VALIDATION, needs_omniglot

WAYS, SHOTS, QUERIES = 4, 2, 3


def _episode(seed: int = 0, ways: int = WAYS, shots: int = SHOTS, queries: int = QUERIES,
             unlabeled: int = 0, size: int = 16) -> Episode:
    """Random images in the FewShotSampler layout: [ways*n, H, W, 1], labels in [0, ways)."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    img = lambda k, n: jax.random.uniform(k, (ways * n, size, size, 1))
    ux = img(ks[2], unlabeled) if unlabeled else None
    return Episode(img(ks[0], shots), jnp.tile(jnp.arange(ways, dtype=jnp.int32), shots),
                   img(ks[1], queries), jnp.tile(jnp.arange(ways, dtype=jnp.int32), queries), ux)


@pytest.fixture(scope="module")
def model():
    learner = ProtoNet(channels=4)
    meta = learner.init(jax.random.PRNGKey(1), _episode())
    logits = jax.jit(lambda m, s, q: learner.predict(m, learner.adapt(m, s, None), q))
    return learner, meta, logits


def _reference_logits(meta, support: Support, query_x, num_classes: int,
                      refine_steps: int = 1) -> np.ndarray:
    """Prototypes and distances in float64 NumPy from the CNN's embeddings."""
    xs = support.x if support.unlabeled_x is None else jnp.concatenate(
        [support.x, support.unlabeled_x])
    emb, stats = jax.jit(nn.cnn_forward)(meta["cnn"], xs)
    emb = np.asarray(emb, np.float64)
    q = np.asarray(jax.jit(nn.cnn_apply)(meta["cnn"], query_x, stats), np.float64)
    n, y = support.x.shape[0], np.asarray(support.y)
    lab, unl = emb[:n], emb[n:]
    protos = np.stack([lab[y == c].mean(0) for c in range(num_classes)])
    sums = np.stack([lab[y == c].sum(0) for c in range(num_classes)])
    counts = np.bincount(y, minlength=num_classes)
    for _ in range(refine_steps if len(unl) else 0):
        d = -((unl[:, None] - protos[None]) ** 2).sum(-1)
        z = np.exp(d - d.max(1, keepdims=True))
        z /= z.sum(1, keepdims=True)
        protos = (sums + z.T @ unl) / (counts + z.sum(0))[:, None]
    return -((q[:, None] - protos[None]) ** 2).sum(-1)


def test_logits_match_numpy_prototypes(model):
    learner, meta, logits = model
    ep = _episode()
    out = np.asarray(logits(meta, ep.support(), ep.query_x))
    assert out.shape == (WAYS * QUERIES, WAYS * SHOTS)  # one column per support slot
    np.testing.assert_allclose(out[:, :WAYS], _reference_logits(meta, ep.support(), ep.query_x,
                                                                WAYS), rtol=1e-4, atol=1e-3)
    assert np.all(out[:, WAYS:] == MASKED_LOGIT)  # labels with no support example
    # num_classes trims the columns to the ways; the loss is unchanged
    trimmed = ProtoNet(channels=4, num_classes=WAYS)
    loss, metrics = jax.jit(learner.loss)(meta, ep, None)
    assert np.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
    np.testing.assert_allclose(jax.jit(trimmed.loss)(meta, ep, None)[0], loss, rtol=1e-5)


def test_semi_supervised_soft_kmeans_matches_numpy(model):
    learner, meta, logits = model
    ep = _episode(seed=3, unlabeled=2)
    sup = ep.support()
    out = np.asarray(logits(meta, sup, ep.query_x))[:, :WAYS]
    np.testing.assert_allclose(out, _reference_logits(meta, sup, ep.query_x, WAYS),
                               rtol=1e-4, atol=1e-3)
    plain = np.asarray(logits(meta, sup._replace(unlabeled_x=None), ep.query_x))[:, :WAYS]
    assert not np.allclose(out, plain)  # the unlabeled samples moved the prototypes


def test_support_order_does_not_matter(model):
    _, meta, logits = model
    ep = _episode(seed=5, unlabeled=1)
    perm = np.random.default_rng(0).permutation(WAYS * SHOTS)
    shuffled = Support(ep.support_x[perm], ep.support_y[perm], ep.unlabeled_x[::-1])
    np.testing.assert_allclose(logits(meta, shuffled, ep.query_x),
                               logits(meta, ep.support(), ep.query_x), rtol=1e-5, atol=1e-4)


def test_label_permutation_permutes_logits(model):
    _, meta, logits = model
    ep = _episode(seed=7)
    pi = np.array([2, 0, 3, 1])
    relabelled = Support(ep.support_x, jnp.asarray(pi)[ep.support_y])
    base = np.asarray(logits(meta, ep.support(), ep.query_x))[:, :WAYS]
    moved = np.asarray(logits(meta, relabelled, ep.query_x))[:, :WAYS]
    np.testing.assert_allclose(moved[:, pi], base, rtol=1e-5, atol=1e-4)


def test_a_query_is_scored_alone(model):
    _, meta, logits = model
    ep = _episode(seed=9)
    together = logits(meta, ep.support(), ep.query_x)
    first = logits(meta, ep.support(), ep.query_x[:1])
    np.testing.assert_allclose(first[0], together[0], rtol=1e-5, atol=1e-4)


def test_gradients_are_finite_with_masked_columns(model):
    learner, meta, _ = model
    ep = _episode(seed=11)
    g = jax.jit(jax.grad(lambda m: learner.loss(m, ep, None)[0]))(meta)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))


# ---------------------------------------------------------------- real data, end to end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from metalearn.training import train

    run_dir = tmp_path_factory.mktemp("protonet") / "run"
    # no validation split and no extra report settings: fewer evaluations to compile
    sets = ["steps=40", "eval_every=0", "eval_episodes=8", "checkpoint_every=0",
            "learner.channels=8", "task.ways=5", "task.eval_ways=0", "task.queries=3",
            "outer.batch_size=4",
            "outer.gradient.learning_rate=0.003", "outer.steps_per_call=40",
            *MINIMAL_NO_VALIDATION, "report_settings=", "test_episodes=8"]
    run, summary = train("protonet_omniglot", sets, run_dir=run_dir, progress=False)
    return run, summary


@needs_omniglot
@pytest.mark.slow  # the trained_run fixture trains first
def test_loss_falls_on_omniglot_and_split_is_kept(trained_run):
    run, summary = trained_run
    losses = [r["loss"] for r in run.metrics() if r["split"] == "train"]
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    split = json.loads((run.path / "split.json").read_text())["splits"]
    alphabets = {k: {c.split("/")[0] for c in v} for k, v in split.items()}
    assert alphabets == {"train": {"Balinese", "Early_Aramaic", "Korean", "Latin"},
                         "test": {"Japanese_(katakana)", "Sanskrit", "Tagalog"}}
    assert summary["test"]["episodes"] == 8 and "test_setting" in summary
    assert (run.path / "plots" / "learning_curves.png").exists()


@pytest.mark.slow  # 17 s; `test_cli.py::test_train_resume_evaluate` covers evaluate by default
@needs_omniglot
def test_evaluate_at_another_setting_with_unlabeled_images(trained_run, capsys):
    """`metalearn evaluate RUN --ways 3 --unlabeled 2`: its own result file, the default kept."""
    from metalearn.cli import main

    run, _ = trained_run
    default = run.path / "eval_test.json"
    default.write_text('{"kept": true}')
    assert main(["evaluate", str(run.path), "--episodes", "6", "--ways", "3", "--shots", "1",
                 "--queries", "2", "--unlabeled", "2"]) == 0
    out = capsys.readouterr().out
    assert "test ways=3 shots=1 queries=2 unlabeled=2 (step 40, 6 episodes, seed 0)" in out
    res = json.loads((run.path / "eval_test_3way_1shot_2query_2unlabeled.json").read_text())
    assert res["setting"] == {"ways": 3, "shots": 1, "queries": 2, "unlabeled": 2,
                              "within_group": False}
    assert 0 <= res["accuracy"] <= 1 and res["episodes"] == 6
    assert json.loads(default.read_text()) == {"kept": True}
    # within one alphabet: Tagalog's 17 characters are too few for 20 ways, the others qualify
    assert main(["evaluate", str(run.path), "--episodes", "4", "--ways", "20",
                 "--within-group"]) == 0
    res = json.loads((run.path / "eval_test_20way_1shot_5query_within_group.json").read_text())
    assert res["setting"]["within_group"] is True and res["episodes"] == 4
    assert main(["evaluate", str(run.path), "--ways", "48", "--within-group"]) == 2
    err = capsys.readouterr().err
    assert "the largest, 'Japanese_(katakana)', has 47); use at most 47 ways" in err


@needs_omniglot
@pytest.mark.slow  # trained_run; test_tasks_fewshot checks the messages by default
def test_evaluate_errors_name_flags_that_evaluate_takes(trained_run, capsys):
    """Too many ways or shots under `metalearn evaluate` name its own flags (--ways, --shots),
    never a `--set` that evaluate refuses nor a Python call; the parser takes each flag named."""
    import re

    from metalearn.cli import build_parser, main

    run, _ = trained_run
    for argv in (["--ways", "2000"], ["--shots", "25"]):
        assert main(["evaluate", str(run.path), "--episodes", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert "filter_min_examples" not in err and "task.ways" not in err
        named = re.findall(r"(--[a-z-]+)(?: (\d+|\.\.\.))?(?! when training)", err)
        flags = [f for f, _ in named if f != "--set"]
        assert flags, err
        for flag, value in named:
            if flag != "--set":
                value = value if value and value.isdigit() else "3"
                build_parser().parse_args(["evaluate", "RUN", flag, value])


@needs_omniglot
def test_minimal_protocol_holds_out_greek_for_validation():
    from metalearn.config import apply_overrides
    from metalearn.experiments import _omniglot, protonet_omniglot

    config = apply_overrides(protonet_omniglot.get_config(), ["data.protocol=minimal"])
    data = _omniglot._splits(config, None)
    groups = {k: set(v.groups) for k, v in data.items()}
    assert groups["validation"] == {"Greek"}
    assert groups["test"] == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert data["train"].num_classes == 112 and data["test"].num_classes == 106


@needs_omniglot
@pytest.mark.slow  # trained_run; test_tasks_fewshot checks manifest errors by default
def test_bad_manifests_fail_on_the_command_line_naming_file_and_entry(trained_run, tmp_path,
                                                                     capsys):
    """`metalearn evaluate RUN --manifest BAD`: one line naming the file and the fix; the run's
    files are untouched."""
    from metalearn.cli import main

    run, _ = trained_run
    exported = json.loads(run.path.joinpath("split.json").read_text())  # any class name
    name = exported["splits"]["test"][0]
    entry = {"class": name, "example": 0}
    cases = {
        "labels.json": ({"episodes": [{"support": [{**entry, "label": 0}],
                                       "query": [{**entry, "example": 1, "label": 3}]}]},
                        "query labels [3] that no support image has"),
        "pairs.json": ({"episodes": [{"support": [[str(tmp_path / "missing.png"), 0]],
                                      "query": [[str(tmp_path / "missing.png"), 0]]}]},
                       "missing.png' not found"),
        "keys.json": ({"format": "x"}, 'has no "episodes" list'),
    }
    before = sorted(p.name for p in run.path.iterdir())
    for fname, (doc, msg) in cases.items():
        (tmp_path / fname).write_text(json.dumps(doc))
        assert main(["evaluate", str(run.path), "--manifest", str(tmp_path / fname)]) == 2
        err = capsys.readouterr().err
        assert fname in err and msg in err, err
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["evaluate", str(run.path), "--manifest", str(tmp_path / "broken.json")]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in run.path.iterdir()) == before


@needs_omniglot
@pytest.mark.slow  # 13 s; manifests from JSON are also checked in test_tasks_fewshot
def test_manifest_of_png_files_scores_like_in_memory_episodes(trained_run, tmp_path):
    from metalearn.evaluation import evaluate_episodes
    from metalearn.reload import evaluate_manifest, load_run
    from metalearn.tasks.data.images import ZIP_SEP

    run, _ = trained_run
    loaded = load_run(run.path)
    exp, meta = loaded.experiment, loaded.meta
    test = exp.splits["test"]
    key, n = jax.random.PRNGKey(42), 6
    exported = test.export_manifest(tmp_path / "exported.json", key, n)
    # the same episodes as plain PNG files on disk (Omniglot's own 105x105 originals), named by
    # path only, so evaluation reads, resizes and normalises them itself
    doc = json.loads(exported.read_text())
    (tmp_path / "png").mkdir()
    zips: dict[str, zipfile.ZipFile] = {}
    for e, ep in enumerate(doc["episodes"]):
        for s, items in ep.items():
            for i, it in enumerate(items):
                archive, member = it["path"].split(ZIP_SEP, 1)
                z = zips.setdefault(archive, zipfile.ZipFile(archive))
                dst = tmp_path / "png" / f"{e}_{s}_{i}.png"
                dst.write_bytes(z.read(member))
                items[i] = {"path": str(dst.relative_to(tmp_path)), "label": it["label"],
                            "rotation": it["rotation"]}
    for z in zips.values():
        z.close()
    manifest = tmp_path / "episodes.json"
    manifest.write_text(json.dumps({"episodes": doc["episodes"]}))
    from_files = evaluate_manifest(run.path, manifest)
    in_memory = evaluate_episodes(exp.evaluator, meta, test.sample_batch(key, n),
                                  jax.random.PRNGKey(MANIFEST_SEED))
    assert from_files["episodes"] == n
    assert from_files["accuracy"] == pytest.approx(in_memory["accuracy"], abs=1e-9)
    assert from_files["loss"] == pytest.approx(in_memory["loss"], rel=1e-5)


def test_report_settings_parse_with_unlabeled_and_within_group():
    from metalearn.experiments._omniglot import parse_settings
    from metalearn.experiments.protonet_omniglot import get_config

    assert parse_settings("20x5x5, 5x1x15,20x1x5+5,20x1x5+2@group") == [
        (20, 5, 5, 0, False), (5, 1, 15, 0, False), (20, 1, 5, 5, False), (20, 1, 5, 2, True)]
    assert parse_settings("") == []
    # the four published settings: 20-way 1-shot is the test split's, the rest are reported
    c = get_config()
    assert (c.task.eval_ways, c.task.shots) == (20, 1)
    assert {(s.ways, s.shots) for s in parse_settings(c.report_settings)} == {(20, 5), (5, 1),
                                                                               (5, 5)}
    for bad in ("20x5", "20x1x5+", "20x1x5+a", "5-way", "20x1x5@alphabet", "20x1x5@"):
        with pytest.raises(ValueError, match=r"expected WAYSxSHOTSxQUERIES"):
            parse_settings(bad)

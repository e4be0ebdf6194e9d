"""A trained few-shot run pointed at a dataset of one's own: `tasks.load_dataset` reads image
folders, IDX pairs and .npz files alike (resized, channels converted) with clear errors, and
`metalearn evaluate RUN --dataset SPEC` scores the run on it, next to (not over) its test
figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metalearn.cli import main
from metalearn.tasks import load_dataset, write_idx
from metalearn.tasks.data.folders import default_omniglot_paths
from tests.helpers import MINIMAL_NO_VALIDATION


def _images(n_classes: int = 4, per_class: int = 3, size: int = 10, channels: int = 1,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [N, H, W(, C)] and their labels, class by class."""
    rng = np.random.default_rng(seed)
    shape = (n_classes * per_class, size, size) + ((channels,) if channels > 1 else ())
    return (rng.integers(0, 256, shape, dtype=np.uint8),
            np.repeat(np.arange(n_classes, dtype=np.uint8), per_class))


def _write_forms(root: Path, x: np.ndarray, y: np.ndarray) -> dict[str, str]:
    """The same images as an IDX pair (gzipped), a folder of plain IDX files, a .npz and a
    folder of PNGs in class folders; the spec of each."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    specs = {}
    if x.ndim == 3:  # IDX files here hold grayscale images
        write_idx(root / "t10k-images-idx3-ubyte.gz", x)
        write_idx(root / "t10k-labels-idx1-ubyte.gz", y)
        specs["idx_gz"] = f"{root}/t10k-images-idx3-ubyte.gz,{root}/t10k-labels-idx1-ubyte.gz"
        (root / "plain").mkdir()
        write_idx(root / "plain" / "train-images-idx3-ubyte", x)
        write_idx(root / "plain" / "train-labels-idx1-ubyte", y)
        specs["idx_folder"] = str(root / "plain")
    np.savez(root / "mine.npz", images=x, labels=y)
    specs["npz"] = str(root / "mine.npz")
    for i, (im, label) in enumerate(zip(x, y, strict=True)):
        p = root / "folder" / f"class{label}" / f"{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(p)
    specs["folder"] = str(root / "folder")
    return specs


@pytest.mark.parametrize("src_channels", [1, 3])
def test_every_form_loads_the_same_images(tmp_path, src_channels):
    x, y = _images(channels=src_channels)
    specs = _write_forms(tmp_path, x, y)
    for size, channels in ((None, None), (6, 1), (6, 3), (14, 3)):
        got = {k: load_dataset(s, image_size=size, channels=channels, cache=False)
               for k, s in specs.items()}
        ref = got.pop("npz")
        hw = size or 10
        assert ref.image_shape == (hw, hw, channels or src_channels)
        assert ref.num_classes == 4 and list(ref.counts) == [3, 3, 3, 3]
        if size is None and channels is None:
            np.testing.assert_array_equal(ref.images.reshape(x.shape), x)
        for k, ds in got.items():
            np.testing.assert_array_equal(ds.images, ref.images, err_msg=k)
            np.testing.assert_array_equal(ds.counts, ref.counts, err_msg=k)
    # gray -> RGB repeats the channel; RGB -> gray is the luminance PIL computes for image files
    rgb = load_dataset(specs["npz"], channels=3).images
    gray = load_dataset(specs["npz"], channels=1).images
    if src_channels == 1:
        assert np.array_equal(rgb, np.repeat(gray, 3, axis=-1))
    else:
        from PIL import Image

        pil = np.asarray(Image.fromarray(x[0]).convert("L"))
        assert np.array_equal(gray[0, 0, ..., 0], pil)
    names = {k: load_dataset(s, cache=False).name for k, s in specs.items()}
    assert names == {**({"idx_gz": "t10k", "idx_folder": "plain"} if src_channels == 1 else {}),
                     "npz": "mine", "folder": "folder"}


def test_bad_datasets_are_refused_naming_the_path_and_the_fix(tmp_path):
    x, y = _images()
    with pytest.raises(FileNotFoundError, match=r"nope.*does not exist; give an image folder"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"IDX labels file .*b-labels.* does not exist"):
        write_idx(tmp_path / "a-images-idx3-ubyte", x)
        load_dataset(f"{tmp_path}/a-images-idx3-ubyte,{tmp_path}/b-labels-idx1-ubyte")
    (tmp_path / "table.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"table.csv: unknown format \(.csv\); give an image "
                                         r"folder .* IMAGES,LABELS .* \.npz"):
        load_dataset(tmp_path / "table.csv")
    np.savez(tmp_path / "wrong.npz", pixels=x, targets=y)
    with pytest.raises(ValueError, match=r"wrong.npz holds the arrays \['pixels', 'targets'\].*"
                                         r"np.savez\(path, x=images, y=labels\)"):
        load_dataset(tmp_path / "wrong.npz")
    np.savez(tmp_path / "short.npz", x=x, y=y[:-1])
    with pytest.raises(ValueError, match=r"short.npz: 12 images but 11 labels"):
        load_dataset(tmp_path / "short.npz")
    write_idx(tmp_path / "a-labels-idx1-ubyte", y[:5])
    with pytest.raises(ValueError, match=r"a-images-idx3-ubyte and .*a-labels-idx1-ubyte: 12 "
                                         r"images but 5 labels"):
        load_dataset(tmp_path)  # the folder's one pair
    with pytest.raises(ValueError, match=r"single IDX file; give the images and the labels"):
        load_dataset(tmp_path / "a-images-idx3-ubyte")
    write_idx(tmp_path / "b-images-idx3-ubyte", x)
    with pytest.raises(ValueError, match=r"not exactly one \*images\*idx\* and one "
                                         r"\*labels\*idx\* file; name the pair"):
        load_dataset(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no images .* and no IDX files"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"channels must be 1 \(grayscale\), 3 \(RGB\)"):
        load_dataset(tmp_path / "short.npz", channels=2)


# ---------------------------------------------------------------- a trained run, end to end

needs_omniglot = pytest.mark.skipif(
    not any(p.exists() for p in default_omniglot_paths()),
    reason=f"Omniglot not found in {default_omniglot_paths()}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The smallest ProtoNet Omniglot run: 2 steps of a 2-block, 4-channel CNN, 5-way."""
    from metalearn.training import train

    run_dir = tmp_path_factory.mktemp("eval_dataset") / "run"
    run, _ = train("protonet_omniglot", TINY, run_dir=run_dir, progress=False)
    return run.path


TINY = ["steps=2", "eval_every=0", "checkpoint_every=0", "test_episodes=2", "eval_batch_size=2",
        "learner.channels=4", "learner.num_blocks=2", "task.ways=5", "task.eval_ways=0",
        "task.queries=2", "task.eval_queries=2", "outer.batch_size=1", "outer.steps_per_call=2",
        *MINIMAL_NO_VALIDATION, "report_settings="]


@needs_omniglot
@pytest.mark.slow  # trains a second tiny run
def test_evaluate_against_another_run_scores_both_on_the_same_episodes(tiny_run, tmp_path,
                                                                        capsys):
    """`metalearn evaluate RUN --against OTHER`: OTHER's figures as its own evaluation gives
    them, and the paired difference of the two; a run of other tasks is refused."""
    import shutil

    from metalearn.reload import evaluate_run
    from metalearn.training import train

    other = tmp_path / "other"
    train("protonet_omniglot", TINY, seed=1, run_dir=other, progress=False)
    res = evaluate_run(tiny_run, episodes=6, against=[other])
    mine, theirs = evaluate_run(tiny_run, episodes=6), evaluate_run(other, episodes=6)
    got = res["against"][str(other)]
    assert res["accuracy"] == mine["accuracy"] and got["accuracy"] == theirs["accuracy"]
    assert got["difference"]["accuracy"] == pytest.approx(mine["accuracy"] - theirs["accuracy"])
    assert got["difference"]["episodes"] == 6
    assert main(["evaluate", str(tiny_run), "--episodes", "6", "--against", str(other),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"  {other}  accuracy=" in out and "difference accuracy=" in out

    shutil.copytree(other, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["task"]["normalize"] = "none"
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"test episodes differ from this run's \(in "
                                         r"normalize\); compare runs trained on the same"):
        evaluate_run(tiny_run, episodes=6, against=[tmp_path / "plain"])


@needs_omniglot
@pytest.mark.slow  # trains a tiny run first (~30 s of compiling)
def test_evaluate_a_run_on_an_idx_dataset_of_ones_own(tiny_run, tmp_path, capsys):
    """`metalearn evaluate RUN --dataset IMAGES,LABELS`: 10 classes of 28x28 digits-like
    images; its own result file, the test figures untouched."""
    spec = _idx_dataset(tmp_path)
    default = tiny_run / "eval_test.json"
    default.write_text('{"kept": true}')
    assert main(["evaluate", str(tiny_run), "--dataset", spec, "--episodes", "3",
                 "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out
    assert "dataset:t10k (step 2, 3 episodes, seed 0): " in out and "accuracy=" in out
    res = json.loads((tiny_run / "eval_dataset_t10k.json").read_text())
    assert json.loads(out[out.index("{"):]) == res
    assert res["episodes"] == 3 and 0 <= res["accuracy"] <= 1
    assert res["dataset"] == {"spec": spec, "name": "t10k", "classes": 10, "examples": 60,
                              "image_shape": [28, 28, 1], "sampler_of": "test"}
    assert json.loads(default.read_text()) == {"kept": True}


def _idx_dataset(root: Path) -> str:
    """10 classes of 6 28x28 grayscale images as an IDX pair; its spec IMAGES,LABELS."""
    x, y = _images(n_classes=10, per_class=6, size=28)
    write_idx(root / "t10k-images-idx3-ubyte.gz", x)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", y)
    return f"{root}/t10k-images-idx3-ubyte.gz,{root}/t10k-labels-idx1-ubyte.gz"


@pytest.mark.slow  # another episode shape: ~10 s more of compiling
@needs_omniglot
def test_evaluate_on_a_dataset_at_another_setting_and_seed(tiny_run, tmp_path, capsys):
    spec = _idx_dataset(tmp_path)
    assert main(["evaluate", str(tiny_run), "--dataset", spec, "--episodes", "2", "--ways", "3",
                 "--shots", "2", "--queries", "1", "--seed", "1", "--no-progress"]) == 0
    assert "dataset:t10k ways=3 shots=2 queries=1 unlabeled=0 (step 2, 2 episodes, seed 1)" \
        in capsys.readouterr().out
    res = json.loads((tiny_run / "eval_dataset_t10k_3way_2shot_1query.json").read_text())
    assert res["setting"] == {"ways": 3, "shots": 2, "queries": 1, "unlabeled": 0,
                              "within_group": False}
    assert res["seed"] == 1 and res["episodes"] == 2 and 0 <= res["accuracy"] <= 1
    assert res["dataset"]["classes"] == 10


@needs_omniglot
@pytest.mark.slow  # trains a tiny run first (~30 s of compiling)
def test_a_dataset_too_small_for_the_episodes_is_refused(tiny_run, tmp_path, capsys):
    x, y = _images(n_classes=3, per_class=6, size=20)  # fewer classes than the run's 5 ways
    np.savez(tmp_path / "three.npz", x=x, y=y)
    before = sorted(p.name for p in tiny_run.iterdir())
    assert main(["evaluate", str(tiny_run), "--dataset", str(tmp_path / "three.npz")]) == 2
    err = capsys.readouterr().err
    assert "three.npz' has 3 classes, fewer than the 5 ways of an episode (the sampler's " \
           "own setting); evaluate with fewer ways: --ways 3" in err, err
    assert main(["evaluate", str(tiny_run), "--dataset", str(tmp_path / "three.npz"),
                 "--ways", "3", "--shots", "5"]) == 2
    err = capsys.readouterr().err
    assert "episodes need 5 shots + 2 queries = 7 images per class, but class '0' has only 6 " \
           "(0 of 3 classes have 7 or more); evaluate with fewer images per class (--shots K, " \
           "--queries Q)" in err, err
    from metalearn.reload import evaluate_run  # from Python: the argument, not the flag

    with pytest.raises(ValueError, match=r"evaluate with fewer ways: ways=3$"):
        evaluate_run(tiny_run, dataset=tmp_path / "three.npz")
    assert main(["evaluate", str(tiny_run), "--dataset", str(tmp_path / "missing")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_run.iterdir()) == before


def test_an_unreadable_file_stops_the_load_naming_the_setting_that_skips_it(tmp_path):
    """`load_dataset` (and `evaluate --dataset`) stop on a file that is not an image, naming
    the setting of the interface in use; `on_error="skip"` leaves it out."""
    from metalearn.messages import cli_mode
    from metalearn.tasks.data.formats import load_dataset

    x, y = _images(n_classes=3, per_class=3, size=10)
    spec = _write_forms(tmp_path, x, y)["folder"]
    (tmp_path / "folder" / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r'broken\.png.*; on_error="skip" leaves out'):
        load_dataset(spec, cache=False)
    for command, fix in (("train", "--set data.on_error=skip"), ("evaluate", "--on-error skip")):
        with cli_mode(command), pytest.raises(ValueError, match=f"; {fix} leaves out"):
            load_dataset(spec, cache=False)
    with pytest.warns(UserWarning, match="broken.png"):
        ds = load_dataset(spec, cache=False, on_error="skip")
    assert ds.num_examples == 9 and ds.num_classes == 3


@needs_omniglot
@pytest.mark.slow  # trains a tiny run first
def test_evaluate_on_a_dataset_with_an_unreadable_file(tiny_run, tmp_path, capsys):
    x, y = _images(n_classes=6, per_class=6, size=20)
    spec = _write_forms(tmp_path, x, y)["folder"]
    (tmp_path / "folder" / "class0" / "broken.png").write_bytes(b"not a png")
    args = ["evaluate", str(tiny_run), "--dataset", spec, "--episodes", "2", "--no-progress"]
    assert main(args) == 2
    assert "--on-error skip leaves out" in capsys.readouterr().err
    assert main([*args, "--on-error", "skip"]) == 0
    assert json.loads((tiny_run / "eval_dataset_folder.json").read_text())["dataset"][
        "examples"] == 36


def test_sklearn_digits_load_as_dark_ink_on_white_with_their_labels():
    """`sklearn:digits`: scikit-learn's 1,797 digits, ink counts 0-16 mapped to 255 (blank) ..
    0 (full ink), labels and class names 0-9; resized like any other form."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    ds = load_dataset("sklearn:digits")
    assert (ds.num_classes, ds.num_examples, ds.image_shape) == (10, 1797, (8, 8, 1))
    assert ds.class_names == [str(i) for i in range(10)]
    assert d.target[0] == 0 and ds.counts.tolist() == np.bincount(d.target).tolist()
    np.testing.assert_array_equal(ds.images[0, 0, ..., 0], np.round(255 * (1 - d.images[0] / 16)))
    assert load_dataset("sklearn:digits", image_size=28).image_shape == (28, 28, 1)


def test_sklearn_datasets_other_than_digits_and_a_missing_sklearn_are_refused(monkeypatch):
    import sys

    with pytest.raises(ValueError, match="shipped with the package is sklearn:digits"):
        load_dataset("sklearn:olivetti_faces")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_dataset("sklearn:digits")

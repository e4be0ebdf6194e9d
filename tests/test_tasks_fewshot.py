"""FewShotSampler: episodes against a NumPy reference, disjointness, labels, rotations, errors,
manifests and the episode plot."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.core import Episode, check_episode
from metalearn.tasks import FewShotSampler, from_numpy, plot_episode, read_manifest
from metalearn.tasks.testing import synthetic_dataset, write_image_tree
from tests.helpers import OMNIGLOT

WAYS, SHOTS, QUERIES = 4, 2, 3
N_EPISODES = 64
sample_batch = jax.jit(lambda s, key, n: s.sample_batch(key, n), static_argnums=2)


@pytest.fixture(scope="module")
def ds():
    """12 classes of 6 images, 8x8x1."""
    return synthetic_dataset(classes=12, examples=6, size=8)


@pytest.fixture(scope="module")
def sampler(ds):
    """4-way 2-shot 3-query with 1 unlabeled image per class and rotations."""
    return FewShotSampler(ds, WAYS, SHOTS, QUERIES, unlabeled=1, rotations=True)


@pytest.fixture(scope="module")
def batch(sampler):
    """Indices and episodes of 64 episodes (one compile each)."""
    idx = sampler.batch_indices(jax.random.split(jax.random.PRNGKey(3), N_EPISODES))
    eps = sample_batch(sampler, jax.random.PRNGKey(3), N_EPISODES)
    return jax.device_get(idx), jax.device_get(eps)


def _reference(ds, refs, e: int) -> np.ndarray:
    """NumPy: the images named by episode e of `refs`, rotated, times float32(1/255)."""
    imgs = [np.rot90(ds.images[c, j], r) for c, j, r in
            zip(refs.cls[e], refs.example[e], refs.rotation[e], strict=True)]
    return np.stack(imgs).astype(np.float32) * np.float32(1 / 255)


def test_shapes_and_dtypes(sampler, batch):
    _, eps = batch
    check_episode(Episode(*eps), batched=True)
    assert eps.support_x.shape == (N_EPISODES, WAYS * SHOTS, 8, 8, 1)
    assert eps.query_x.shape == (N_EPISODES, WAYS * QUERIES, 8, 8, 1)
    assert eps.unlabeled_x.shape == (N_EPISODES, WAYS, 8, 8, 1)
    assert eps.support_x.dtype == np.float32 and eps.support_y.dtype == np.int32
    assert eps.query_y.dtype == np.int32
    one = jax.eval_shape(sampler.sample, jax.random.PRNGKey(0))
    assert one.support_x.shape == (WAYS * SHOTS, 8, 8, 1) and one.support_y.shape == (8,)


def test_episodes_equal_numpy_reference(ds, batch):
    """sample_batch == NumPy gather + np.rot90 + scaling of the indices, for every image."""
    idx, eps = batch
    for e in range(0, N_EPISODES, 7):
        np.testing.assert_array_equal(eps.support_x[e], _reference(ds, idx.support, e))
        np.testing.assert_array_equal(eps.query_x[e], _reference(ds, idx.query, e))
        np.testing.assert_array_equal(eps.unlabeled_x[e], _reference(ds, idx.unlabeled, e))
        np.testing.assert_array_equal(eps.support_y[e], idx.support.label[e])
        np.testing.assert_array_equal(eps.query_y[e], idx.query.label[e])


def test_vmap_of_sample_equals_sample_batch(sampler, batch):
    _, eps = batch
    keys = jax.random.split(jax.random.PRNGKey(3), N_EPISODES)
    v = jax.jit(jax.vmap(sampler.sample))(keys)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(eps), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_support_query_unlabeled_disjoint_and_consistent(batch):
    idx, _ = batch
    for e in range(N_EPISODES):
        sets = [idx.support, idx.query, idx.unlabeled]
        keys = [set(zip(r.cls[e], r.example[e], r.rotation[e], strict=True)) for r in sets]
        sizes = [WAYS * SHOTS, WAYS * QUERIES, WAYS]
        assert [len(k) for k in keys] == sizes  # no repeated image within a set
        assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
        # one label per (class, rotation) and the same in every set; `ways` distinct classes
        lab = {}
        for r in sets[:2]:
            for c, rot, y in zip(r.cls[e], r.rotation[e], r.label[e], strict=True):
                assert lab.setdefault((c, rot), y) == y
        assert sorted(lab.values()) == list(range(WAYS))
        np.testing.assert_array_equal(np.bincount(idx.support.label[e]), [SHOTS] * WAYS)
        np.testing.assert_array_equal(np.bincount(idx.query.label[e]), [QUERIES] * WAYS)
        assert {(c, r) for c, r in zip(idx.unlabeled.cls[e], idx.unlabeled.rotation[e],
                                       strict=True)} == set(lab)


def test_labels_permuted_per_episode(batch):
    """The label a class gets, and the label at each query position, vary across episodes."""
    idx, _ = batch
    label_of: dict[tuple, set] = {}
    for e in range(N_EPISODES):
        for c, r, y in zip(idx.query.cls[e], idx.query.rotation[e], idx.query.label[e],
                           strict=True):
            label_of.setdefault((c, r), set()).add(int(y))
    assert max(len(v) for v in label_of.values()) >= 3
    assert all(len(set(idx.query.label[:, p])) > 1 for p in range(WAYS * QUERIES))
    first = idx.query.label[:, 0]
    assert len(set(first)) == WAYS  # position 0 holds every label in some episode


def test_determinism(ds, batch):
    """A new sampler with the same settings gives the same episodes for the same key."""
    again = FewShotSampler(ds, WAYS, SHOTS, QUERIES, unlabeled=1, rotations=True)
    b = sample_batch(again, jax.random.PRNGKey(3), N_EPISODES)
    for x, y in zip(b, batch[1], strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    c = sample_batch(again, jax.random.PRNGKey(8), N_EPISODES)
    assert not np.array_equal(np.asarray(c.query_x), batch[1].query_x)


def test_rotation_classes(batch):
    """With rotations there are 4x classes, all four rotations occur, and a rotated class is
    a different class: the same character at two angles can be in one episode."""
    idx, _ = batch
    assert set(np.unique(idx.support.rotation)) == {0, 1, 2, 3}
    both = 0
    for e in range(N_EPISODES):
        pairs = set(zip(idx.support.cls[e], idx.support.rotation[e], strict=True))
        both += len({c for c, _ in pairs}) < len(pairs)
    assert both > 0
    # the rotated pixels really are np.rot90 of the stored image: checked by the reference test


def test_unequal_counts_never_sample_padding():
    """Classes with 3..8 examples: every sampled example index < its class count."""
    counts = [3, 8, 4, 5, 8, 3, 6, 7]
    ds = synthetic_dataset(classes=8, examples=counts, size=4)
    s = FewShotSampler(ds, ways=5, shots=1, queries=2)
    idx = jax.device_get(s.batch_indices(jax.random.split(jax.random.PRNGKey(0), 200)))
    for r in (idx.support, idx.query):
        assert np.all(r.example < np.asarray(counts)[r.cls])
    seen = {(c, j) for c, j in zip(idx.query.cls.ravel(), idx.query.example.ravel(),
                                    strict=True)}
    assert (1, 7) in seen and (0, 2) in seen  # the whole valid range is used


def test_normalisation_options(ds):
    raw = ds.images[:3, :2]
    x = raw.astype(np.float64)
    for norm, want in [("unit", x / 255), ("centered", x * (2 / 255) - 1),
                       ("invert", 1 - x / 255), ("none", x),
                       ((0.5, 0.25), (x / 255 - 0.5) / 0.25)]:
        got = FewShotSampler(ds, 3, 1, 1, normalize=norm).normalize_images(raw)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    px = ds.images.astype(np.float64) / 255
    got = FewShotSampler(ds, 3, 1, 1, normalize="standard").normalize_images(raw)
    np.testing.assert_allclose(np.asarray(got), (x / 255 - px.mean()) / px.std(), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(ValueError, match=r"unknown normalize='zscore'; use one of"):
        FewShotSampler(ds, 3, 1, 1, normalize="zscore")


def test_with_ways_shots_and_describe(sampler):
    ev = sampler.with_ways_shots(ways=2, shots=5, queries=1, unlabeled=0)
    e = jax.eval_shape(ev.sample, jax.random.PRNGKey(0))
    assert e.support_x.shape[0] == 10 and e.query_x.shape[0] == 2 and e.unlabeled_x is None
    assert ev._rows is sampler._rows  # the device array is shared, not copied
    d = ev.describe()
    json.dumps(d)
    assert (d["ways"], d["shots"], d["queries"], d["rotations"], d["classes"]) == \
        (2, 5, 1, True, 48)


def test_sampler_is_a_pytree_without_embedded_constants(sampler):
    """Passed to jit as an argument, the images are an input of the program, not a constant."""
    leaves = jax.tree.leaves(sampler)
    assert any(leaf is sampler._rows for leaf in leaves)
    hlo = sample_batch.lower(sampler, jax.random.PRNGKey(0), N_EPISODES).as_text()
    assert f"tensor<{sampler._rows.shape[0]}x{sampler._rows.shape[1]}xui8>" in hlo
    assert len(hlo) < 200_000


# ---------------------------------------------------------------- errors


def test_error_too_many_ways(ds):
    with pytest.raises(ValueError, match=re.escape(
            "ways=13 but dataset 'synthetic' has only 12 classes; use ways=12 or rotations as "
            "classes (rotations=true)")):
        FewShotSampler(ds, 13, 1, 1)
    with pytest.raises(ValueError, match=re.escape(
            "ways=49 but dataset 'synthetic' has only 48 classes (12 x 4 rotations)")):
        FewShotSampler(ds, 49, 1, 1, rotations=True)


def test_error_too_many_examples(ds):
    with pytest.raises(ValueError, match=re.escape(
            "shots + queries = 5 + 2 = 7 examples per class needed, but class 'g0/c00' of "
            "'synthetic' has only 6 (examples per class: 6 to 6)")):
        FewShotSampler(ds, 2, 5, 2)
    with pytest.raises(ValueError, match=re.escape(
            "shots + queries + unlabeled = 2 + 2 + 3 = 7 examples per class needed")):
        FewShotSampler(ds, 2, 2, 2, unlabeled=3)


def test_error_empty_split(ds):
    with pytest.raises(ValueError, match=re.escape(
            "dataset 'synthetic' has no classes (empty split?)")):
        FewShotSampler(ds.subset([]), 1, 1, 1)


def test_error_bad_arguments(ds):
    with pytest.raises(ValueError, match="FewShotSampler: shots must be an integer >= 1, got 0"):
        FewShotSampler(ds, 2, 0, 1)
    rect = from_numpy(np.zeros((8, 4, 6), np.uint8), np.repeat(np.arange(4), 2))
    with pytest.raises(ValueError, match="rotations=True needs square images, got 4x6"):
        FewShotSampler(rect, 2, 1, 1, rotations=True)


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize("suffix", ["json", "csv"])
def test_manifest_round_trip(tmp_path, sampler, ds, batch, suffix):
    """export_manifest(key, n) lists the episodes of sample_batch(key, n); reading it back
    gives the same arrays."""
    path = sampler.export_manifest(tmp_path / f"eps.{suffix}", jax.random.PRNGKey(3),
                                   N_EPISODES)
    back = sampler.episodes_from_manifest(path)
    for a, b in zip(back, batch[1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    eps = read_manifest(path)
    assert len(eps) == N_EPISODES and len(eps[0]["support"]) == WAYS * SHOTS
    first = eps[0]["query"][0]
    assert first["class"] in ds.class_names and int(first["rotation"]) in (0, 90, 180, 270)


def test_manifest_of_image_files(tmp_path):
    """A user's own episodes: image paths (relative to the manifest) with labels, preprocessed
    exactly like dataset images (decode, resize, normalise)."""
    imgs = write_image_tree(tmp_path / "mine", {"a/x": 2, "a/y": 2}, size=12)
    ds = from_numpy(np.zeros((4, 6, 6), np.uint8), np.repeat(np.arange(2), 2))
    s = FewShotSampler(ds, 2, 1, 1)
    man = {"episodes": [{
        "support": [{"path": "mine/a/x/0000_01.png", "label": 0},
                    {"path": "mine/a/y/0000_01.png", "label": 1}],
        "query": [{"path": "mine/a/y/0001_02.png", "label": 1},
                  {"path": "mine/a/x/0001_02.png", "label": 0}]}]}
    (tmp_path / "m.json").write_text(json.dumps(man))
    ep = s.episodes_from_manifest(tmp_path / "m.json")
    assert ep.support_x.shape == (1, 2, 6, 6, 1)
    np.testing.assert_array_equal(np.asarray(ep.query_y), [[1, 0]])
    from metalearn.tasks.data.images import resize_array

    ref = resize_array(imgs["a/y"][1][..., None], 6).astype(np.float32) * np.float32(1 / 255)
    np.testing.assert_array_equal(np.asarray(ep.query_x[0, 0]), ref)


def test_manifest_errors(tmp_path, sampler):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"episodes": [
        {"support": [{"class": "nope", "example": 0, "label": 0}],
         "query": [{"class": "nope", "example": 1, "label": 0}]}]}))
    with pytest.raises(KeyError, match="class 'nope' is not in the sampler's dataset"):
        sampler.episodes_from_manifest(bad)
    with pytest.raises(FileNotFoundError, match="manifest .*missing.csv does not exist"):
        sampler.episodes_from_manifest(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="use a .json or .csv file name"):
        sampler.export_manifest(tmp_path / "eps.txt", jax.random.PRNGKey(0), 1)
    c0, c1 = sampler.dataset.class_names[:2]
    item = lambda c, j, y, **kw: {"class": c, "example": j, "label": y, **kw}
    for query, msg in [
            ([item(c1, 1, 1)], "episode 0 has query labels \\[1\\] that no support image has"),
            ([item(c0, 1, 0, rotation=45)], "rotation 45 is not a multiple of 90"),
            ([{"class": c0, "example": 1}], "episode 0 query\\[0\\] has no label"),
            ([item(c0, 9, 0)], "class 'g0/c00' has 6 examples, example 9 does not exist")]:
        bad.write_text(json.dumps({"episodes": [{"support": [item(c0, 0, 0)],
                                                 "query": query}]}))
        with pytest.raises((ValueError, IndexError), match=msg):
            sampler.episodes_from_manifest(bad)


def test_plot_episode(tmp_path, batch):
    from PIL import Image

    eps = Episode(*batch[1])
    p = plot_episode(jax.tree.map(lambda a: a[0], eps), tmp_path / "ep.png")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100
    with pytest.raises(ValueError, match="needs one episode"):
        plot_episode(eps, tmp_path / "b.png")


def test_uint8_images_stay_uint8_on_device(sampler):
    assert sampler._rows.dtype == jnp.uint8


def test_batch_sampler_equals_sample_batch(sampler, batch):
    """The compiled batch sampler (CPU: XLA loop emitters) gives the very same episodes."""
    got = sampler.batch_sampler(N_EPISODES)(jax.random.PRNGKey(3))
    for a, b in zip(got, batch[1], strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_rgb_per_channel_normalisation_in_sampled_episodes():
    """Per-channel (mean, std) on RGB rows: every sampler path equals the NumPy formula."""
    ds = synthetic_dataset(classes=6, examples=5, size=6, channels=3)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    s = FewShotSampler(ds, 3, 2, 2, rotations=True, normalize=(mean, std))
    key = jax.random.PRNGKey(1)
    idx = jax.device_get(s.batch_indices(jax.random.split(key, 5)))
    for eps in (sample_batch(s, key, 5), s.batch_sampler(5)(key)):
        for e in range(5):
            raw = np.stack([np.rot90(ds.images[c, j], r) for c, j, r in zip(
                idx.query.cls[e], idx.query.example[e], idx.query.rotation[e], strict=True)])
            want = (raw / 255 - np.asarray(mean)) / np.asarray(std)
            np.testing.assert_allclose(np.asarray(eps.query_x[e]), want, rtol=1e-5, atol=1e-5)


def test_adding_unlabeled_images_keeps_the_labelled_episode(sampler, batch):
    """The same key with or without unlabeled images: the same support and query (paired
    comparisons of semi-supervised learners)."""
    _, eps = batch
    other = jax.device_get(sample_batch(sampler.with_ways_shots(unlabeled=0),
                                        jax.random.PRNGKey(3), N_EPISODES))
    for f in ("support_x", "support_y", "query_x", "query_y"):
        np.testing.assert_array_equal(getattr(other, f), getattr(eps, f))
    assert other.unlabeled_x is None and eps.unlabeled_x.shape[1] == WAYS


def test_random_permutation_is_uniform():
    """All 24 orders of 4 items appear about equally often (chi-square, p ~ 1e-4 cut-off)."""
    from metalearn.tasks.fewshot import random_permutation

    perms = np.asarray(jax.jit(jax.vmap(lambda k: random_permutation(k, 4)))(
        jax.random.split(jax.random.PRNGKey(0), 24_000)))
    assert np.all(np.sort(perms, 1) == np.arange(4))
    _, counts = np.unique(perms, axis=0, return_counts=True)
    assert len(counts) == 24
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 55  # 23 degrees of freedom


@pytest.mark.skipif(not OMNIGLOT.exists(), reason=f"Omniglot minimal sets not at {OMNIGLOT}")
def test_omniglot_20_way_1_shot_on_held_out_alphabets(tmp_path):
    """The user story: a few lines give held-out-alphabet episodes and a PNG of one."""
    from metalearn.tasks import load_omniglot, split_by_group

    ds = load_omniglot(cache_dir=tmp_path)
    splits = split_by_group(ds, {"train": 0.75, "test": 0.25}, seed=0)
    test = FewShotSampler(splits["test"], ways=20, shots=1, queries=2)
    idx = jax.device_get(test.batch_indices(jax.random.split(jax.random.PRNGKey(0), 8)))
    held_out = set(splits["test"].groups)
    assert not held_out & set(splits["train"].groups)
    for r in (idx.support, idx.query):
        assert {splits["test"].groups[c] for c in np.unique(r.cls)} <= held_out
    ep = test.gather(jax.tree.map(lambda a: a[0], idx))
    assert ep.support_x.shape == (20, 28, 28, 1) and float(ep.support_x.max()) == 1.0
    assert plot_episode(ep, tmp_path / "episode.png").stat().st_size > 10_000


def test_impossible_requests_name_the_setting_of_the_interface_in_use():
    """Too many ways or shots: Python names the argument (and the dataset filter), `metalearn
    train` the config key, `metalearn evaluate` its own flags and never a --set it refuses."""
    import contextlib

    from metalearn.messages import cli_mode

    ds = synthetic_dataset(classes=6, examples=4, size=6)
    cases = {"": ("ways=6", "shots=...", "filter_min_examples(5)"),
             "train": ("--set task.ways=6", "--set task.shots=...", None),
             "evaluate": ("--ways 6", "--shots ... / --queries ...", None)}
    for command, (ways, shots, extra) in cases.items():
        with cli_mode(command) if command else contextlib.nullcontext():
            with pytest.raises(ValueError) as e_ways:
                FewShotSampler(ds, 7, 1, 1)
            with pytest.raises(ValueError) as e_shots:
                FewShotSampler(ds, 2, 3, 2)
        assert f"use {ways}" in str(e_ways.value), str(e_ways.value)
        assert shots in str(e_shots.value), str(e_shots.value)
        assert (extra in str(e_shots.value)) if extra else \
            "filter_min_examples" not in str(e_shots.value)
        if command == "evaluate":
            assert "--set task.rotations=true when training" in str(e_ways.value)

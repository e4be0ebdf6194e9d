"""Dataset loaders: image folders and zips (Omniglot layout, deduplication), IDX, NumPy, TFDS,
the .npz cache, and the real minimal Omniglot sets when ../shared is present."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from metalearn.tasks import (
    ImageDataset,
    concat,
    from_numpy,
    load_idx,
    load_image_folder,
    load_omniglot,
    load_tfds,
    read_idx,
    write_idx,
)
from metalearn.tasks.data.cache import load_npz
from metalearn.tasks.data.folders import OMNIGLOT_ENV
from metalearn.tasks.data.images import resize_array
from metalearn.tasks.testing import synthetic_dataset, write_image_tree
from tests.helpers import OMNIGLOT

LAYOUT_A = {"Greek/character01": 3, "Greek/character02": 3, "Latin/character01": 2}


def _check_class(ds: ImageDataset, name: str, want: np.ndarray) -> None:
    c = ds.class_names.index(name)
    assert ds.counts[c] == len(want)
    np.testing.assert_array_equal(ds.images[c, :len(want), :, :, 0], want)
    assert np.all(ds.images[c, len(want):] == 0)  # padding


def test_folder_and_zip_layouts_with_dedup(tmp_path):
    """A zip and a folder sharing the Greek alphabet (identical files): Greek is loaded once;
    alphabets are the groups; the zip's single top folder is not a level."""
    a = write_image_tree(tmp_path, LAYOUT_A, size=10, seed=1,
                         zip_path=tmp_path / "images_background_small1.zip",
                         top="images_background_small1")
    greek = {k: v for k, v in LAYOUT_A.items() if k.startswith("Greek")}
    assert list(LAYOUT_A)[:2] == list(greek)  # same seed, same first draws: same images
    b = write_image_tree(tmp_path / "set2", greek, size=10, seed=1)
    b.update(write_image_tree(tmp_path / "set2", {"Tagalog/character01": 4}, size=10, seed=2))
    for k in greek:
        np.testing.assert_array_equal(a[k], b[k])
    ds = load_image_folder([tmp_path / "images_background_small1.zip", tmp_path / "set2"],
                           cache=False)
    assert ds.class_names == ["Greek/character01", "Greek/character02", "Latin/character01",
                              "Tagalog/character01"]
    assert ds.groups == ["Greek", "Greek", "Latin", "Tagalog"]
    assert ds.images.shape == (4, 4, 10, 10, 1) and ds.images.dtype == np.uint8
    for name, imgs in {**a, **b}.items():
        _check_class(ds, name, imgs)
    assert ds.paths[0][0].endswith("images_background_small1.zip::images_background_small1/"
                                   "Greek/character01/0000_01.png")


def test_resize_at_load_time_is_antialiased(tmp_path):
    imgs = write_image_tree(tmp_path / "d", {"A/c1": 2, "A/c2": 2}, size=16)
    ds = load_image_folder(tmp_path / "d", image_size=8, cache=False)
    assert ds.image_shape == (8, 8, 1)
    want = resize_array(imgs["A/c1"][0][..., None], 8)
    np.testing.assert_array_equal(ds.images[0, 0], want)
    # antialiased: close to 2x2 box means of the original, unlike nearest-neighbour
    box = imgs["A/c1"][0].reshape(8, 2, 8, 2).mean((1, 3))
    assert np.abs(want[..., 0].astype(float) - box).mean() < 20


def test_class_folder_layout_and_mixed_sizes(tmp_path):
    write_image_tree(tmp_path / "flat", {"cat": 2, "dog": 3}, size=6)
    ds = load_image_folder(tmp_path / "flat", cache=False)
    assert ds.class_names == ["cat", "dog"] and ds.groups == ["flat", "flat"]
    write_image_tree(tmp_path / "mixed", {"a": 1}, size=6)
    write_image_tree(tmp_path / "mixed", {"b": 1}, size=7)
    with pytest.raises(ValueError, match=r"classes have images of different sizes .*"
                                         r"pass image_size=\.\.\. to resize"):
        load_image_folder(tmp_path / "mixed", cache=False)


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images .* found in"):
        load_image_folder(tmp_path / "empty", cache=False)
    with pytest.raises(FileNotFoundError, match="image folder or zip .*nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere", cache=False)


def test_missing_omniglot_message(tmp_path, monkeypatch):
    monkeypatch.setenv(OMNIGLOT_ENV, str(tmp_path / "no_omniglot"))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"Omniglot not found at {tmp_path / 'no_omniglot'}. Download images_background.zip")
            + ".*set METALEARN_OMNIGLOT="):
        load_omniglot()


def test_cache_reuse_and_corrupt_cache_rebuilt(tmp_path):
    write_image_tree(tmp_path / "d", {"A/c1": 2, "B/c1": 3}, size=6)
    first = load_image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1
    again = load_image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.images, again.images)
    assert again.class_names == first.class_names and again.paths == first.paths
    # a truncated cache file is detected, reported and rebuilt
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="corrupt dataset cache .*; rebuilding it"):
        rebuilt = load_image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(rebuilt.images, first.images)
    load_npz(files[0])  # the rewritten cache is sound
    # a cache whose pixels changed (but is still a valid npz) fails its checksum
    ds = load_npz(files[0])
    ds.images[0, 0, 0, 0, 0] ^= 1
    with np.load(files[0]) as z:
        meta = z["meta"]
    np.savez(files[0], images=ds.images, counts=ds.counts, meta=meta)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_npz(files[0])


def test_from_numpy_groups_by_label():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (11, 5, 5), dtype=np.uint8)
    labels = np.array([2, 0, 2, 1, 0, 2, 2, 1, 0, 0, 0])
    ds = from_numpy(images, labels, class_names=["zero", "one", "two"], name="arr")
    np.testing.assert_array_equal(ds.counts, [5, 2, 4])
    assert ds.class_names == ["zero", "one", "two"] and ds.images.shape == (3, 5, 5, 5, 1)
    for c in range(3):
        np.testing.assert_array_equal(ds.images[c, :ds.counts[c], ..., 0], images[labels == c])
    floats = from_numpy(images / 255.0, labels)
    np.testing.assert_array_equal(floats.images, ds.images)
    with pytest.raises(ValueError, match="float images must lie in \\[0, 1\\]"):
        from_numpy(images * 2.0, labels)
    with pytest.raises(ValueError, match="11 images but 3 labels"):
        from_numpy(images, labels[:3])


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 7, 7), dtype=np.uint8)
    labels = rng.integers(0, 4, 20).astype(np.uint8)
    ip = tmp_path / f"t10k-images-idx3-ubyte{suffix}"
    lp = tmp_path / f"t10k-labels-idx1-ubyte{suffix}"
    write_idx(ip, images)
    write_idx(lp, labels)
    np.testing.assert_array_equal(read_idx(ip), images)
    np.testing.assert_array_equal(read_idx(lp), labels)
    ds = load_idx(ip, lp, name="mnist")
    ref = from_numpy(images, labels, name="mnist")
    np.testing.assert_array_equal(ds.images, ref.images)
    np.testing.assert_array_equal(ds.counts, np.bincount(labels))
    floats = rng.normal(size=(3, 2)).astype(np.float32)
    write_idx(tmp_path / "f.idx", floats)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), floats)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "ok").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"header says shape \(4, 3\) \(12 bytes\) but the file "
                                         r"holds 10 bytes"):
        read_idx(tmp_path / "short")


def test_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with warnings.catch_warnings(), tfds.testing.mock_data(num_examples=40):
        warnings.simplefilter("ignore")
        ds = load_tfds("mnist", split="train", cache_dir=tmp_path)
        again = load_tfds("mnist", split="train", cache_dir=tmp_path)  # from the cache
    assert ds.images.dtype == np.uint8 and ds.image_shape == (28, 28, 1)
    assert ds.num_examples == 40 and ds.num_classes <= 10
    assert set(ds.class_names) <= {str(i) for i in range(10)}
    np.testing.assert_array_equal(ds.images, again.images)
    assert ds.name == "mnist/train" and len(list(tmp_path.glob("tfds-mnist-*.npz"))) == 1


def test_subset_select_concat():
    ds = synthetic_dataset(classes=6, examples=[2, 3, 4, 2, 3, 4], size=4)
    sub = ds.subset([4, 1])
    assert sub.class_names == ["g1/c04", "g1/c01"] and list(sub.counts) == [3, 3]
    np.testing.assert_array_equal(sub.images[0], ds.images[4])
    assert ds.select(["g1/c04", "g1/c01"]).class_names == sub.class_names
    with pytest.raises(KeyError, match="1 of 2 classes are not in dataset 'synthetic'"):
        ds.select(["g1/c04", "zzz"])
    other = synthetic_dataset(classes=2, examples=5, size=4, name="other")
    other = other.subset([0, 1])
    other.class_names = ["o/0", "o/1"]
    both = concat([ds, other])
    assert both.num_classes == 8 and both.images.shape[1] == 5
    assert both.sources == ["synthetic"] * 6 + ["other"] * 2
    assert ds.filter_min_examples(4).class_names == ["g2/c02", "g2/c05"]
    with pytest.raises(ValueError, match="cannot concatenate datasets with image shapes"):
        concat([ds, synthetic_dataset(classes=2, size=5)])


@pytest.mark.skipif(not OMNIGLOT.exists(), reason=f"Omniglot minimal sets not at {OMNIGLOT}")
def test_real_minimal_omniglot(tmp_path):
    """Both minimal background sets: 8 alphabets, Greek and Latin once each, 20 per class."""
    ds = load_omniglot([OMNIGLOT / "images_background_small1.zip",
                        OMNIGLOT / "images_background_small2.zip"], cache_dir=tmp_path)
    assert sorted(set(ds.groups)) == ["Balinese", "Early_Aramaic", "Greek",
                                      "Japanese_(katakana)", "Korean", "Latin", "Sanskrit",
                                      "Tagalog"]
    assert ds.num_classes == 242 and ds.image_shape == (28, 28, 1)
    assert np.all(ds.counts == 20)
    assert ds.groups.count("Greek") == 24 and ds.groups.count("Latin") == 26
    # ink is black on white, as stored: mostly white pixels
    assert np.median(ds.images) == 255 and ds.images.min() < 50
    assert set(ds.sources) == {"omniglot/images_background_small1",
                               "omniglot/images_background_small2"}

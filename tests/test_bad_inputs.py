"""Bad inputs get errors that name the file (and episode, entry or row) and say the fix:
malformed manifests, corrupt or non-image files in folders, zips and manifests, unsafe zip
members; and `ImageDataset.describe` reports the real examples per class."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from metalearn.tasks import (
    FewShotSampler,
    load_image_folder,
    load_omniglot,
    read_manifest,
)
from metalearn.tasks.data.manifest import write_manifest
from metalearn.tasks.testing import synthetic_dataset, write_image_tree


@pytest.fixture(scope="module")
def sampler():
    """2-way 1-shot 1-query on 4 classes of 3, 3, 3, 2 6x6 images (g0/c00, g1/c01, ...)."""
    return FewShotSampler(synthetic_dataset(classes=4, examples=[3, 3, 3, 2], size=6), 2, 1, 1)


def _png(value: int = 0, size: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _episode(support_labels, query_labels) -> dict:
    item = lambda c, y: {"class": f"g{c % 3}/c{c:02d}", "example": 0, "label": y}
    return {"episodes": [{"support": [item(c, y) for c, y in enumerate(support_labels)],
                          "query": [item(c, y) for c, y in enumerate(query_labels)]}]}


def _raises_both(sampler, path: Path, exc: type, match: str) -> None:
    """read_manifest and episodes_from_manifest both refuse the manifest with `match`."""
    with pytest.raises(exc, match=match):
        read_manifest(path)
    with pytest.raises(exc, match=match):
        sampler.episodes_from_manifest(path)


# ---------------------------------------------------------------- manifests


@pytest.mark.parametrize("support, query, msg", [
    ([0, 2], [0, 0], r"episode 0: the support labels \[0, 2\] must be exactly 0\.\.1 "
                     r"\(2 classes, one label each\); missing \[1\]"),
    ([-1, 0], [0, 0], r"support labels \[-1, 0\] must be exactly 0\.\.1 .*missing \[1\]"),
    ([0, 1], [0, 2], r"episode 0 has query labels \[2\] that no support image has "
                     r"\(support labels are 0\.\.1\)"),
    ([0, 1], [0, -1], r"episode 0 has query labels \[-1\] that no support image has"),
    ([0, 1], [0, "a"], r"episode 0 query\[1\]: label 'a' is not an integer; labels are 0\.\.N-1"),
    ([0, 1.5], [0, 1], r"episode 0 support\[1\]: label 1\.5 is not an integer"),
])
def test_manifest_labels_are_checked(tmp_path, sampler, support, query, msg):
    """Out-of-range, negative and non-integer labels were accepted (NaN loss) or gave raw int()
    messages; now the file, episode and entry are named."""
    path = _write(tmp_path / "m.json", _episode(support, query))
    _raises_both(sampler, path, ValueError, re.escape(str(path)) + ".*" + msg)


def test_manifest_json_structure_errors(tmp_path, sampler):
    path = tmp_path / "m.json"
    for doc, msg in [
            ("{oops", r"m\.json is not valid JSON \(Expecting property name .*line 1 column 2"),
            ({"format": "x"}, r'm\.json has no "episodes" list \(found keys \[\'format\'\]\); '
                              r'expected \{"episodes": \['),
            ({"episodes": [[1, 2]]}, r"episode 0 is a list, not an object"),
            ({"episodes": [{"support": [5], "query": []}]},
             r"episode 0 support\[0\]: 5 is not an entry; expected .*\[path, label\]"),
            ({"episodes": [{"support": [["a.png", 0, 1]], "query": []}]},
             r"support\[0\]: \['a\.png', 0, 1\] is not an entry"),
            ({"episodes": [{"support": [{"class": "g0/c00", "example": 0, "label": 0}],
                            "queries": [{"class": "g0/c00", "example": 1, "label": 0}]}]},
             r"episode 0 has no query images \(keys: support, queries\)"),
            ({"episodes": [{"support": [{"class": "g0/c00", "example": -1, "label": 0}],
                            "query": []}]},
             r"support\[0\]: example -1 is not an integer >= 0")]:
        _raises_both(sampler, _write(path, doc), ValueError, msg)


def test_manifest_path_label_pairs(tmp_path, sampler):
    """`[path, label]` entries (and `path` / `[path]` in the unlabeled set) read like objects;
    they crashed with AttributeError before."""
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    pairs = {"support": [["0.png", 0], ["1.png", 1]], "query": [["1.png", 1], ["0.png", 0]],
             "unlabeled": ["2.png", ["0.png"]]}
    obj = lambda i, y: {"path": f"{i}.png", "label": y}
    objects = {"support": [obj(0, 0), obj(1, 1)], "query": [obj(1, 1), obj(0, 0)],
               "unlabeled": [{"path": "2.png"}, {"path": "0.png"}]}
    a = sampler.episodes_from_manifest(_write(tmp_path / "a.json", {"episodes": [pairs]}))
    b = sampler.episodes_from_manifest(_write(tmp_path / "b.json", [objects]))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(a.query_y), [[1, 0]])
    assert a.unlabeled_x.shape == (1, 2, 6, 6, 1)
    assert float(a.unlabeled_x[0, 0].max()) == pytest.approx(80 / 255)
    assert read_manifest(tmp_path / "a.json")[0]["support"][1] == {"path": "1.png", "label": 1,
                                                                   "rotation": 0}
    with pytest.raises(ValueError, match=r"episode 0 support\[0\] has no label"):
        read_manifest(_write(tmp_path / "c.json", [{"support": ["0.png"], "query": []}]))


def test_manifest_csv_bad_rows(tmp_path, sampler):
    item = lambda c, y: {"class": f"g{c}/c0{c}", "example": 0, "rotation": 0, "label": y}
    path = write_manifest(tmp_path / "m.csv", [{"support": [item(0, 0), item(1, 1)],
                                                "query": [item(1, 1)]}])
    lines = path.read_text().splitlines()
    assert lines[0].startswith("episode,set,label")
    for row, msg in [("0,query,x,g0/c00,1,0,", r"row 3 \(episode 0 query\[0\]\): label 'x' is "
                                                r"not an integer"),
                     ("0,train,0,g0/c00,1,0,", r"row 3: set 'train' is not one of"),
                     ("0,query,0,g0/c00,1,45,", r"row 3 .*: rotation '45' is not a multiple of 90"),
                     ("0,query,0,g0/c00,1,0,,extra", r"row 3 has more fields than the header"),
                     (",query,0,g0/c00,1,0,", r"row 3 has no episode")]:
        path.write_text("\n".join([lines[0], lines[1], row, *lines[2:]]) + "\n")
        _raises_both(sampler, path, ValueError, re.escape(str(path)) + " " + msg)


def test_manifest_missing_and_unreadable_images(tmp_path, sampler):
    """Missing files, files that are not images and zip members name the file and the entry."""
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(_png(size=64)[:60])
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("x/ok.png", _png())
    where = r"m\.json: episode 0 query\[0\]: "
    for ref, exc, msg in [
            ("nope.png", FileNotFoundError, r"image file 'nope\.png' not found \(also looked in"),
            ("text.png", ValueError, r".*text\.png is not a readable image \(not in an image "
                                     r"format PIL reads\); replace the file or remove the entry"),
            ("cut.png", ValueError, r".*cut\.png is not a readable image"),
            ("a.zip::x/no.png", FileNotFoundError, r"image 'x/no\.png' not found in the zip "
                                                   r".*a\.zip"),
            ("ok.png::x/ok.png", ValueError, r".*ok\.png \(in 'ok\.png::x/ok\.png'\) is not a "
                                             r"zip file")]:
        man = [{"support": [["ok.png", 0]], "query": [[ref, 0]]}]
        with pytest.raises(exc, match=where + msg):
            sampler.episodes_from_manifest(_write(tmp_path / "m.json", man))
    man = [{"support": [["ok.png", 0]], "query": [["a.zip::x/ok.png", 0]]}]
    ep = sampler.episodes_from_manifest(_write(tmp_path / "m.json", man))
    assert ep.query_x.shape == (1, 1, 6, 6, 1)


# ---------------------------------------------------------------- image folders and zips


def _bad_tree(root: Path) -> None:
    """Classes A/c1 (2 good images + a text file named .png), A/c2 (a truncated PNG only) and
    B/c1 (1 good image)."""
    write_image_tree(root, {"A/c1": 2, "B/c1": 1}, size=6)
    (root / "A" / "c1" / "notes.png").write_text("not an image")
    (root / "A" / "c2").mkdir()
    (root / "A" / "c2" / "cut.png").write_bytes(_png(size=64)[:60])


def test_image_folder_unreadable_files_raise_or_skip(tmp_path):
    _bad_tree(tmp_path / "d")
    with pytest.raises(ValueError, match=r"dataset 'd': .*notes\.png is not a readable image "
                                         r"\(not in an image format PIL reads\); "
                                         r'on_error="skip" leaves out'):
        load_image_folder(tmp_path / "d", cache=False)
    with pytest.warns(UserWarning, match=r"skipped 2 files that are not readable images: "
                                         r".*notes\.png, .*cut\.png; dropped 1 classes left "
                                         r"without images: A/c2"):
        ds = load_image_folder(tmp_path / "d", cache=False, on_error="skip")
    assert ds.class_names == ["A/c1", "B/c1"] and ds.counts.tolist() == [2, 1]
    assert [len(p) for p in ds.paths] == [2, 1] and ds.describe()["examples_per_class"] == [1, 2]
    with pytest.raises(ValueError, match="on_error must be one of"):
        load_image_folder(tmp_path / "d", cache=False, on_error="ignore")
    (tmp_path / "bad" / "A").mkdir(parents=True)
    (tmp_path / "bad" / "A" / "x.png").write_text("text")
    with pytest.raises(ValueError, match=r"dataset 'bad': none of the 1 image files is a "
                                         r"readable image: .*x\.png"):
        load_image_folder(tmp_path / "bad", cache=False, on_error="skip")


def test_skip_is_part_of_the_cache_key(tmp_path):
    """A dataset cached with on_error="skip" is not served to a later on_error="raise" load."""
    _bad_tree(tmp_path / "d")
    with pytest.warns(UserWarning, match="skipped 2 files"):
        load_image_folder(tmp_path / "d", cache_dir=tmp_path / "cache", on_error="skip")
    with pytest.raises(ValueError, match="is not a readable image"):
        load_image_folder(tmp_path / "d", cache_dir=tmp_path / "cache")
    again = load_image_folder(tmp_path / "d", cache_dir=tmp_path / "cache", on_error="skip")
    assert again.counts.tolist() == [2, 1]


def test_zip_and_omniglot_unreadable_members(tmp_path):
    """Files in a zip are named archive.zip::member; load_omniglot passes on_error through."""
    arch = tmp_path / "images_background_small1.zip"
    write_image_tree(tmp_path, {"Greek/character01": 2, "Latin/character01": 1}, size=6,
                     zip_path=arch,
                     top="images_background_small1")
    with zipfile.ZipFile(arch, "a") as z:
        z.writestr("images_background_small1/Greek/character01/bad.png", b"GIF89a junk")
    member = re.escape(f"{arch}::images_background_small1/Greek/character01/bad.png")
    with pytest.raises(ValueError, match=f"dataset 'omniglot': {member} is not a readable image"):
        load_omniglot([arch], cache=False)
    with pytest.warns(UserWarning, match=f"skipped 1 files that are not readable images: "
                                         f"{member}$"):
        ds = load_omniglot([arch], cache=False, on_error="skip")
    assert ds.class_names == ["Greek/character01", "Latin/character01"]
    assert ds.counts.tolist() == [2, 1]


@pytest.mark.parametrize("member", ["../../../../tmp/x/char/a.png", "/abs/a.png",
                                    "cls/../../a.png", "C:/x/a.png"])
def test_zip_members_outside_the_archive_are_refused(tmp_path, member):
    arch = tmp_path / "evil.zip"
    with zipfile.ZipFile(arch, "w") as z:
        z.writestr("ok/a.png", _png())
        z.writestr(member, _png())
    with pytest.raises(ValueError, match=re.escape(f"zip {arch}: member {member!r} has an "
                                                   "absolute path or '..'; refusing it")):
        load_image_folder(arch, cache=False)


# ---------------------------------------------------------------- describe


def test_describe_reports_min_and_max_examples_per_class(tmp_path, sampler):
    """It said [0, max] (`min(initial=0)`), also in exported manifests."""
    ds = synthetic_dataset(classes=3, examples=[4, 2, 3], size=6)
    assert ds.describe()["examples_per_class"] == [2, 4]
    assert ds.subset([]).describe()["examples_per_class"] == [0, 0]
    path = sampler.export_manifest(tmp_path / "m.json", jax.random.PRNGKey(0), 1)
    doc = json.loads(path.read_text())
    assert doc["sampler"]["dataset"]["examples_per_class"] == [2, 3]

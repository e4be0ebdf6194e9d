"""The Omniglot protocols (vinyals, lake, ht, minimal): class counts, splits and rotation handling,
on a stand-in with the full Omniglot's class names and, where present, on the real data."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from metalearn.config import apply_overrides
from metalearn.experiment import ConfigDict
from metalearn.experiments import _omniglot, protonet_omniglot
from metalearn.outer.gradient import GradientOuterLoop
from metalearn.tasks import FewShotSampler
from metalearn.tasks.data import omniglot as O
from metalearn.tasks.data.splits import VINYALS_TEST, VINYALS_VALIDATION
from metalearn.tasks.testing import synthetic_dataset
from tests.helpers import OMNIGLOT, needs_full_omniglot


@pytest.fixture(scope="module")
def stand_in():
    """The full Omniglot's 1,623 class names, alphabets and sources, 6 random 4x4 images each."""
    return O.synthetic_omniglot(examples=6, size=4)


def _names(parts):
    return {k: set(v.class_names) for k, v in parts.items()}


def _alphabets(part):
    return set(part.groups)


@pytest.mark.parametrize("protocol", ["vinyals", "lake", "ht"])
def test_full_protocols_partition_the_1623_characters(stand_in, protocol):
    parts = O.protocol_split(stand_in, protocol)
    names = _names(parts)
    assert {k: len(v) for k, v in names.items()} == O.PROTOCOLS[protocol].sizes
    assert sum(len(v) for v in names.values()) == 1623
    assert set().union(*names.values()) == set(stand_in.class_names)  # disjoint and covering


def test_vinyals_split_is_by_alphabet(stand_in):
    parts = O.protocol_split(stand_in, "vinyals")
    assert _alphabets(parts["validation"]) == set(VINYALS_VALIDATION)
    assert _alphabets(parts["test"]) == set(VINYALS_TEST) | {"Gurmukhi"}
    gurmukhi = [c for c in parts["test"].class_names if c.startswith("Gurmukhi/")]
    assert gurmukhi == [f"Gurmukhi/character{i}" for i in range(42, 46)]


def test_lake_split_trains_on_background_tests_on_evaluation(stand_in):
    parts = O.protocol_split(stand_in, "lake")
    assert _alphabets(parts["test"]) == set(O.EVALUATION_ALPHABETS)
    assert _alphabets(parts["validation"]) == set(O.LAKE_VALIDATION)
    assert _alphabets(parts["train"]) == set(O.BACKGROUND_ALPHABETS) - set(O.LAKE_VALIDATION)
    with pytest.raises(ValueError, match=r"validation alphabets \['Angelic'\] are not "
                                         "background alphabets"):
        O.lake_split(stand_in, validation=("Angelic",))
    with pytest.raises(ValueError, match="lake_split needs both full Omniglot sets"):
        O.lake_split(synthetic_dataset(classes=8, examples=1, size=2))


def test_ht_split_is_a_seeded_random_class_split(stand_in):
    parts = O.protocol_split(stand_in, "ht")
    again = O.ht_split(stand_in)
    assert _names(parts) == _names(again)
    other = O.ht_split(stand_in, seed=2023)
    assert _names(other)["test"] != _names(parts)["test"]
    # a random class split, not an alphabet split: most alphabets are in every part
    assert len(_alphabets(parts["train"]) & _alphabets(parts["test"])) > 40
    # the permutation is of the classes in name order, background first
    order = sorted(stand_in.class_names,
                   key=lambda c: (c.split("/")[0] not in O.BACKGROUND_ALPHABETS, c))
    perm = np.random.RandomState(O.HT_SEED).permutation(1623)
    assert set(parts["validation"].class_names) == {order[i] for i in perm[1150:1200]}
    with pytest.raises(ValueError, match="ht_split: sizes .* sum to 1623, but dataset"):
        O.ht_split(stand_in.subset(range(100)))


def test_a_full_protocol_on_other_data_names_the_fix(stand_in):
    with pytest.raises(ValueError, match="protocol 'vinyals' expects the full Omniglot .* "
                                         "data.protocol=minimal"):
        O.protocol_split(stand_in.subset(range(300)), "vinyals")
    with pytest.raises(KeyError, match="unknown Omniglot protocol 'snell'; choose one of "
                                       "vinyals, lake, ht, minimal"):
        O.get_protocol("snell")


# ---------------------------------------------------------------- samplers of each protocol


@pytest.fixture
def experiment_data(monkeypatch, stand_in):
    """`_omniglot.samplers` reads the stand-in instead of the Omniglot files."""
    monkeypatch.setattr(_omniglot, "load_protocol", lambda *a, **k: stand_in)


def _samplers(*sets):
    config = apply_overrides(protonet_omniglot.get_config(), ["task.ways=5", *sets])
    return _omniglot.samplers(config, None)


def test_vinyals_rotations_are_classes_in_every_split(experiment_data):
    s = _samplers()
    assert {k: (v.rotations, v.random_rotation, v.num_classes) for k, v in s.items()} == {
        "train": (True, False, 4 * 1028), "validation": (True, False, 4 * 172),
        "test": (True, False, 4 * 423)}
    assert not s["test"].within_group and s["test"].ways == 20  # task.eval_ways


def test_ht_rotation_is_per_class_augmentation_in_training_only(experiment_data):
    s = _samplers("data.protocol=ht")
    assert (s["train"].rotations, s["train"].random_rotation, s["train"].num_classes) == \
        (False, True, 1150)
    for split in ("validation", "test"):
        assert not s[split].rotations and not s[split].random_rotation
    assert s["test"].num_classes == 423


def test_lake_tests_within_one_alphabet_without_rotations(experiment_data):
    s = _samplers("data.protocol=lake")
    assert s["train"].rotations and s["train"].num_classes == 4 * 792
    assert s["test"].within_group and not s["test"].rotations
    assert set(s["test"].describe()["groups_eligible"]) == set(O.EVALUATION_ALPHABETS)


def test_rotation_fields_override_the_protocol(experiment_data):
    s = _samplers("task.rotations=augment", "task.eval_rotations=none")
    assert s["train"].random_rotation and not s["test"].rotations
    with pytest.raises(ValueError, match="task.rotations='sideways': use auto, classes, "
                                         "augment, none"):
        _samplers("task.rotations=sideways")
    with pytest.raises(ValueError, match="task.eval_rotations=augment: test episodes are not "
                                         "augmented"):
        _samplers("task.eval_rotations=augment")


def test_runs_made_before_protocols_read_as_minimal_with_boolean_rotations():
    old = ConfigDict({"data": {"paths": ""}, "task": {"rotations": True}})
    assert _omniglot.protocol_of(old) == "minimal"
    assert _omniglot.rotation_mode(True, "none", "task.rotations") == "classes"
    assert _omniglot.rotation_mode(False, "classes", "task.rotations") == "none"
    assert _omniglot.rotation_mode("auto", "augment", "task.rotations") == "augment"


def test_a_bad_protocol_fails_before_any_data_is_read(monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("data read before the config was checked")

    monkeypatch.setattr(_omniglot, "load_protocol", no_loading)
    with pytest.raises(KeyError, match="unknown Omniglot protocol 'vinyal'"):
        _samplers("data.protocol=vinyal")
    with pytest.raises(ValueError, match="report setting '20x1': expected WAYSxSHOTSxQUERIES"):
        _samplers("report_settings=20x1")


# ---------------------------------------------------------------- random rotation per class


def test_random_rotation_turns_each_class_as_a_whole():
    ds = synthetic_dataset(classes=10, examples=6, size=6)
    s = FewShotSampler(ds, 5, 2, 3, random_rotation=True, normalize="none")
    assert s.num_classes == 10  # no extra classes
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    idx = jax.device_get(s.batch_indices(keys))
    eps = jax.device_get(s.sample_batch(jax.random.PRNGKey(0), 200))
    seen = set()
    for e in range(200):
        for refs in (idx.support, idx.query):
            rot = {}
            for c, r, y in zip(refs.cls[e], refs.rotation[e], refs.label[e], strict=True):
                assert rot.setdefault(int(y), (int(c), int(r))) == (int(c), int(r))
        classes = [rot[y][0] for y in range(5)]
        assert len(set(classes)) == 5  # base classes: a character never twice in an episode
        q = {int(y): int(r) for y, r in zip(idx.query.label[e], idx.query.rotation[e],
                                            strict=True)}
        assert q == {y: rot[y][1] for y in range(5)}  # support and queries turned alike
        seen |= {r for _, r in rot.values()}
    assert seen == {0, 1, 2, 3}
    # the pixels are np.rot90 of the stored images
    e, i = 7, 3
    c, j, r = (int(a[e, i]) for a in (idx.support.cls, idx.support.example,
                                      idx.support.rotation))
    np.testing.assert_array_equal(np.asarray(eps.support_x[e, i]),
                                  np.rot90(ds.images[c, j], r).astype(np.float32))
    with pytest.raises(ValueError, match="rotations=True .* and random_rotation=True .* "
                                         "exclude each other"):
        FewShotSampler(ds, 5, 1, 1, rotations=True, random_rotation=True)
    assert s.replace(random_rotation=False).num_classes == 10
    assert s.describe()["random_rotation"] is True


# ---------------------------------------------------------------- learning-rate schedules


def test_step_and_exponential_schedules_of_the_papers():
    snell = GradientOuterLoop(schedule="step", decay_every=2000, decay_rate=0.5).lr_schedule()
    assert [float(snell(t)) for t in (0, 1999, 2000, 4000, 5999)] == pytest.approx(
        [1e-3, 1e-3, 5e-4, 2.5e-4, 2.5e-4])
    ht = GradientOuterLoop(learning_rate=0.02, schedule="exponential", decay_every=100_000,
                           decay_rate=0.95).lr_schedule()
    for t in (0, 50_000, 4_000_000):
        assert float(ht(t)) == pytest.approx(0.02 * 0.95 ** (t / 1e5), rel=1e-5)
    old = GradientOuterLoop(schedule="exponential", total_steps=800).lr_schedule()
    assert float(old(200)) == pytest.approx(5e-4)  # halves every horizon / 4, as before
    with pytest.raises(ValueError, match="schedule='step' needs decay_every >= 1"):
        GradientOuterLoop(schedule="step")


# ---------------------------------------------------------------- the real data


@needs_full_omniglot
def test_real_full_omniglot_matches_the_protocol_facts(stand_in):
    ds = O.load_protocol("vinyals", [OMNIGLOT / "full"])
    assert ds.num_classes == 1623 and ds.images.shape[1:] == (20, 28, 28, 1)
    assert set(ds.counts.tolist()) == {O.DRAWINGS}
    assert sorted(ds.class_names) == sorted(stand_in.class_names)
    for i in range(0, 1623, 97):  # alphabets and sources as the stand-in has them
        j = stand_in.class_names.index(ds.class_names[i])
        assert (ds.groups[i], ds.sources[i]) == (stand_in.groups[j], stand_in.sources[j])
    for protocol in ("vinyals", "lake", "ht"):
        assert _names(O.protocol_split(ds, protocol)) == \
            _names(O.protocol_split(stand_in, protocol))

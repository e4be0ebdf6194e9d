"""Affine augmentation (`tasks.augment`) and within-group episodes of `FewShotSampler`: the warp
against SciPy and NumPy, the identity, seeding, per-class transforms, group choice and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from metalearn.tasks import FewShotSampler
from metalearn.tasks.augment import IDENTITY, NUM_PARAMS, Augment, from_setting, sample_params, warp
from metalearn.tasks.testing import synthetic_dataset


def _params(n: int = 1, **set_) -> jnp.ndarray:
    """Identity rows with some entries set: rotation, shear_r, shear_c, scale_r, scale_c, t_r,
    t_c."""
    names = ("rotation", "shear_r", "shear_c", "scale_r", "scale_c", "t_r", "t_c")
    row = np.array(IDENTITY, np.float32)
    for k, v in set_.items():
        row[names.index(k)] = v
    return jnp.tile(jnp.asarray(row), (n, 1))


@pytest.fixture(scope="module")
def images():
    """Three random 28x28 images with 2 channels (float32)."""
    return np.random.default_rng(0).random((3, 28, 28, 2)).astype(np.float32)


def test_identity_gives_the_input_back_exactly(images):
    assert np.array_equal(np.asarray(warp(images, _params(3))), images)
    ds = synthetic_dataset(classes=8, examples=5, size=8)
    plain = FewShotSampler(ds, 3, 1, 2, rotations=True)
    off = plain.replace(augment=Augment(strength=0.0))
    sample = jax.jit(lambda s, k: s.sample(k))
    a, b = sample(plain, jax.random.PRNGKey(4)), sample(off, jax.random.PRNGKey(4))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("degrees", [7.0, -25.0])
def test_rotation_matches_scipy_rotate(images, degrees):
    """Counter-clockwise rotation about the centre, as `scipy.ndimage.rotate` (bilinear)."""
    out = np.asarray(warp(images, _params(3, rotation=np.deg2rad(degrees))))
    for i in range(3):
        for c in range(2):
            ref = ndi.rotate(images[i, ..., c], degrees, reshape=False, order=1, mode="nearest")
            np.testing.assert_allclose(out[i, ..., c], ref, atol=2e-5)


def test_quarter_turn_is_rot90(images):
    out = warp(images, _params(3, rotation=np.pi / 2))
    np.testing.assert_allclose(out, np.rot90(images, 1, axes=(1, 2)), atol=2e-5)


def test_full_affine_matches_scipy_affine_transform(images):
    """Rotation, shear, scale and translation together against `affine_transform` with the
    inverse map built in NumPy from the module docstring's T = R Sh S."""
    th, rho, s, t = 0.3, (0.2, -0.1), (1.15, 0.85), (0.05, -0.03)
    p = _params(3, rotation=th, shear_r=rho[0], shear_c=rho[1], scale_r=s[0], scale_c=s[1],
                t_r=t[0], t_c=t[1])
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    fwd = rot @ np.array([[1, rho[0]], [rho[1], 1]]) @ np.diag(s)
    inv = np.linalg.inv(fwd)
    centre = np.array([13.5, 13.5])
    offset = centre - inv @ (centre + 28 * np.array(t))  # input = inv @ q + offset
    out = np.asarray(warp(images, p))
    for c in range(2):
        ref = ndi.affine_transform(images[1, ..., c].astype(np.float64), inv, offset=offset,
                                   order=1, mode="nearest")
        np.testing.assert_allclose(out[1, ..., c], ref, atol=2e-5)


def test_translation_by_whole_pixels_shifts_the_image(images):
    out = np.asarray(warp(images, _params(3, t_r=2 / 28, t_c=-3 / 28)))
    np.testing.assert_allclose(out[:, 5:, :20], images[:, 3:-2, 3:23], atol=1e-5)


def test_sample_params_stay_in_their_ranges_and_follow_the_key():
    aug = Augment()
    p = np.asarray(sample_params(jax.random.PRNGKey(0), 4000, aug))
    assert p.shape == (4000, NUM_PARAMS)
    assert np.abs(p[:, 0]).max() <= np.deg2rad(10) + 1e-6
    assert np.abs(p[:, 1:3]).max() <= 0.3 + 1e-6
    assert np.abs(p[:, 3:5] - 1).max() <= 0.2 + 1e-6
    assert np.abs(p[:, 5:7]).max() <= 2 / 105 + 1e-6
    # each component is on with probability 0.5 (Koch et al.)
    assert 0.45 < np.mean(p[:, 0] != 0) < 0.55
    np.testing.assert_array_equal(p, sample_params(jax.random.PRNGKey(0), 4000, aug))
    assert not np.array_equal(p, sample_params(jax.random.PRNGKey(1), 4000, aug))
    half = np.asarray(sample_params(jax.random.PRNGKey(0), 4000, Augment(strength=0.5)))
    np.testing.assert_allclose(half[:, 0], p[:, 0] / 2, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def grouped():
    """30 classes in 3 groups (g0, g1, g2: 10 each) of 6 images, 8x8."""
    return synthetic_dataset(classes=30, examples=6, size=8, groups=3)


# in the slow run (compiling-heavy; the default suite keeps under 10 min); the identity and
# within-group tests exercise the augmentation by default
@pytest.mark.slow
@pytest.mark.parametrize("per_class", [False, True])
def test_augmented_episodes_same_key_same_images_per_image_and_per_class(grouped, per_class):
    """The batch sampler equals `vmap(sample)`; the distortion is that of the episode's
    parameters applied to the undistorted episode (same classes and examples); per class, all
    images of a label share one transform."""
    base = FewShotSampler(grouped, 4, 2, 3, unlabeled=1, rotations=True)
    s = base.replace(augment=Augment(per_class=per_class))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    both = jax.jit(lambda s, b, k: (jax.vmap(s.sample)(k), s.batch_indices(k),
                                    jax.vmap(b.sample)(k)))
    eps, idx, plain = both(s, base, keys)
    again = s.batch_sampler(3)(jax.random.PRNGKey(0))
    for x, y in zip(jax.tree.leaves(eps), jax.tree.leaves(again), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    idx = jax.device_get(idx)
    affine = {n: np.asarray(getattr(idx, n).affine) for n in ("support", "query", "unlabeled")}
    assert not np.allclose(eps.query_x, plain.query_x)
    flat = lambda a: a.reshape(-1, *a.shape[2:])
    np.testing.assert_allclose(flat(eps.query_x), warp(flat(plain.query_x),
                                                       jnp.asarray(flat(affine["query"]))),
                               atol=1e-5)
    labels = {n: np.asarray(getattr(idx, n).label) for n in affine}
    for e in range(3):
        for y in range(4):
            rows = np.concatenate([affine[n][e][labels[n][e] == y] for n in affine])
            assert np.all(rows == rows[0]) == per_class


def test_augment_is_for_training_and_manifests_refuse_it(grouped, tmp_path):
    s = FewShotSampler(grouped, 3, 1, 1, augment=Augment())
    with pytest.raises(ValueError, match=r"cannot record.*replace\(augment=None\)"):
        s.export_manifest(tmp_path / "m.json", jax.random.PRNGKey(0), 2)
    s.replace(augment=None).export_manifest(tmp_path / "m.json", jax.random.PRNGKey(0), 2)
    assert from_setting("none") is None and from_setting("class").per_class
    with pytest.raises(ValueError, match="task.augment='rotate': use none, image"):
        from_setting("rotate")
    with pytest.raises(ValueError, match="scale x strength must be < 1"):
        Augment(strength=5.0)
    with pytest.raises(TypeError, match="augment must be a tasks.augment.Augment"):
        FewShotSampler(grouped, 3, 1, 1, augment="image")


def test_within_group_episodes_draw_their_classes_from_one_group(grouped):
    s = FewShotSampler(grouped, 5, 1, 2, rotations=True, within_group=True)
    idx = jax.device_get(s.batch_indices(jax.random.split(jax.random.PRNGKey(0), 300)))
    group = np.array([int(g[1:]) for g in grouped.groups])[idx.support.cls]
    assert (group == group[:, :1]).all()
    assert set(group[:, 0]) == {0, 1, 2}
    for r in (idx.support, idx.query):  # still 5 distinct classes (class, rotation) per episode
        n = len({(c, k) for c, k in zip(r.cls[0], r.rotation[0], strict=True)})
        assert n == 5
    across = jax.device_get(FewShotSampler(grouped, 5, 1, 2, rotations=True).batch_indices(
        jax.random.split(jax.random.PRNGKey(0), 50)))
    g_across = np.array([int(g[1:]) for g in grouped.groups])[across.support.cls]
    assert (g_across != g_across[:, :1]).any(axis=1).mean() > 0.8


@pytest.mark.slow  # 6 s: two compiles of 3000 episodes; the default run checks one group each
def test_group_choice_in_proportion_to_classes_or_uniform():
    """Groups of 12, 6 and 3 classes: 4-way episodes never come from the 3-class group; the
    others are chosen 2:1 (classes) or 1:1 (uniform)."""
    names = [f"g{g}" for g, n in ((0, 12), (1, 6), (2, 3)) for _ in range(n)]
    ds = synthetic_dataset(classes=len(names), examples=4, size=8)
    ds.groups = names
    n = 3000
    for weighting, share in (("classes", 2 / 3), ("uniform", 1 / 2)):
        s = FewShotSampler(ds, 4, 1, 1, within_group=True, group_weighting=weighting)
        assert s.describe()["groups_eligible"] == {"g0": 12, "g1": 6}
        cls = np.asarray(s.batch_indices(jax.random.split(jax.random.PRNGKey(1), n)).support.cls)
        first = np.array([names[c] for c in cls[:, 0]])
        assert "g2" not in set(first)
        frac = np.mean(first == "g0")
        assert abs(frac - share) < 4 * np.sqrt(share * (1 - share) / n), (weighting, frac)


def test_within_group_errors_name_the_largest_group_and_the_fix(grouped):
    with pytest.raises(ValueError, match=r"no group of 'synthetic' has 11 classes \(the largest, "
                                         r"'g0', has 10\); use at most 10 ways"):
        FewShotSampler(grouped, 11, 1, 1, within_group=True)
    FewShotSampler(grouped, 11, 1, 1, within_group=True, rotations=True)  # 40 per group
    with pytest.raises(ValueError, match="group_weighting='size': use classes"):
        FewShotSampler(grouped, 3, 1, 1, within_group=True, group_weighting="size")
    with pytest.raises(TypeError, match="unknown settings"):
        FewShotSampler(grouped, 3, 1, 1).replace(within=True)


@pytest.mark.slow  # 13 s: compiles an augmented episode and draws it
def test_sampler_plot_names_the_group_and_the_augmentation(grouped, tmp_path, monkeypatch):
    import metalearn.tasks.plotting as plotting

    seen = {}
    real = plotting.plot_episode

    def spy(ep, path, max_per_row, title, label_names):
        seen.update(title=title, names=label_names)
        return real(ep, path, max_per_row, title, label_names)

    monkeypatch.setattr(plotting, "plot_episode", spy)
    s = FewShotSampler(grouped, 4, 1, 2, within_group=True, augment=Augment(per_class=True))
    path = s.plot(jax.random.PRNGKey(0), tmp_path / "ep.png")
    assert path.stat().st_size > 5_000
    group = seen["names"][0].split("/")[0]
    assert seen["title"] == (f"4-way 1-shot, 2 queries per class; within {group}; affine "
                             "augmentation per class")
    assert len(seen["names"]) == 4 and all(n.startswith(group + "/") for n in seen["names"])

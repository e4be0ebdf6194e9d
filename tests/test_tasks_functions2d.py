"""Synthetic 2-D classification task families against independent NumPy rules."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from metalearn.core import check_episode
from metalearn.tasks.functions2d import FAMILIES, FAMILY_DOCS, Functions2D

KEY = jax.random.PRNGKey(11)
FIXED = ("xor", "nxor", "or", "and", "qand", "nand")
RANDOM = ("circle", "moons", "random_linear", "random_xor", "square", "stripe")


def fixed_rule(name: str, x: np.ndarray) -> np.ndarray:
    """The label of a fixed-parameter family, written out in NumPy."""
    a, b = x[:, 0], x[:, 1]
    return {"xor": np.sign(a) != np.sign(b),
            "nxor": np.sign(a) == np.sign(b),
            "or": np.logical_or(a > 0, b > 0),
            "and": np.logical_and(a > 0, b > 0),
            "qand": np.logical_and(a < 0, b > 0),
            "nand": np.logical_not(np.logical_and(a > 0, b > 0))}[name]


def rotate(x: np.ndarray, t: float) -> np.ndarray:
    """Points [n, 2] rotated counter-clockwise by t."""
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return x @ rot.T


def random_margin(name: str, x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Signed margin (label 1 where > 0) of a random-parameter family, float64, from the four
    U[0, 1) parameter draws p mapped onto the documented ranges."""
    x, p = x.astype(np.float64), p.astype(np.float64)
    if name == "circle":
        centre, radius = p[:2] - 0.5, 0.3 + 0.4 * p[2]
        assert -0.5 <= centre.min() and centre.max() <= 0.5 and 0.3 <= radius <= 0.7
        return radius**2 - np.sum((x - centre) ** 2, axis=1)
    if name == "random_linear":
        point, t = p[:2] - 0.5, 2 * np.pi * p[2]
        return (x - point) @ np.array([np.cos(t), np.sin(t)])
    if name == "random_xor":
        z = rotate(x - (0.6 * p[1:3] - 0.3), 2 * np.pi * p[0])
        return -z[:, 0] * z[:, 1]
    if name == "square":
        return 0.35 + 0.4 * p[0] - np.abs(x).max(axis=1)
    if name == "stripe":
        t, c, w = np.pi * p[0], 0.6 * p[1] - 0.3, 0.2 + 0.3 * p[2]
        return w - np.abs(x[:, 0] * np.cos(t) + x[:, 1] * np.sin(t) - c)
    raise KeyError(name)


@pytest.fixture(scope="module")
def drawn():
    """120 episodes of 512 points over every family (one compiled call), with each episode's
    family index and parameter draws (u[1:5] of the documented flat draw)."""
    s = Functions2D(families=FAMILIES, num_support=256, num_queries=256)

    def one(k):
        return s.sample(k), s.family_index(k), jax.random.uniform(k, (5 + 7 * 512,))[1:5]

    keys = jax.random.split(KEY, 120)
    eps, fam, params = jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(keys))
    x = np.concatenate([np.asarray(eps.support_x), np.asarray(eps.query_x)], axis=1)
    y = np.concatenate([np.asarray(eps.support_y), np.asarray(eps.query_y)], axis=1)
    assert set(fam.tolist()) == set(range(len(FAMILIES))), "every family drawn at least once"
    return eps, x, y, fam, params, s, np.asarray(keys)


def test_api_shapes_and_docs(drawn):
    eps, x, y, *_ = drawn
    check_episode(eps, batched=True)
    assert eps.support_x.shape == (120, 256, 2) and eps.query_x.shape == (120, 256, 2)
    assert eps.support_x.dtype == np.float32 and eps.support_y.dtype == np.int32
    assert set(np.unique(y).tolist()) == {0, 1}
    assert FAMILIES == ("xor", "nxor", "or", "and", "qand", "nand", "circle", "moons",
                        "random_linear", "random_xor", "square", "stripe")
    assert set(FAMILY_DOCS) == set(FAMILIES) and all(FAMILY_DOCS.values())
    d = Functions2D().describe()
    assert d == {"sampler": "Functions2D", "families": ["xor", "or"], "num_support": 64,
                 "num_queries": 64, "input_range": 1.0, "label_noise": 0.0}
    json.dumps(d)


def test_fixed_families_match_numpy_rules(drawn):
    _, x, y, fam, *_ = drawn
    for name in FIXED:
        rows = np.flatnonzero(fam == FAMILIES.index(name))
        assert rows.size, name
        for i in rows:
            assert np.abs(x[i]).max() <= 1.0
            np.testing.assert_array_equal(y[i], fixed_rule(name, x[i]).astype(np.int32),
                                          err_msg=name)


def test_random_families_match_their_documented_parameters(drawn):
    _, x, y, fam, params, *_ = drawn
    for name in ("circle", "random_linear", "random_xor", "square", "stripe"):
        rows = np.flatnonzero(fam == FAMILIES.index(name))
        assert rows.size, name
        for i in rows:
            m = random_margin(name, x[i], params[i])
            clear = np.abs(m) > 1e-5  # float32 vs float64 rounding only matters at the boundary
            assert clear.mean() > 0.99
            np.testing.assert_array_equal(y[i][clear], (m[clear] > 0).astype(np.int32),
                                          err_msg=name)


def test_moons_points_lie_on_their_class_moon(drawn):
    _, x, y, fam, params, *_ = drawn
    t = np.linspace(0, np.pi, 400)
    upper = np.stack([np.cos(t), np.sin(t)], 1)  # class 0 (make_moons' outer arc)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)  # class 1
    rows = np.flatnonzero(fam == FAMILIES.index("moons"))
    assert rows.size
    for i in rows:
        assert np.abs(x[i]).max() <= 1.2
        q = rotate(x[i].astype(np.float64), -2 * np.pi * params[i, 0]) * 1.6 + [0.5, 0.25]
        d0 = np.min(np.linalg.norm(q[:, None] - upper[None], axis=-1), axis=1)
        d1 = np.min(np.linalg.norm(q[:, None] - lower[None], axis=-1), axis=1)
        own = np.where(y[i] == 1, d1, d0)
        assert np.mean(own < 0.4) > 0.99  # noise std 0.1 per coordinate
        assert np.mean(own <= np.where(y[i] == 1, d0, d1)) > 0.9
        assert 0.4 < y[i].mean() < 0.6  # the class is a fair coin


def test_random_families_have_both_classes(drawn):
    _, _, y, fam, *_ = drawn
    for name in RANDOM:
        rows = np.flatnonzero(fam == FAMILIES.index(name))
        assert rows.size, name
        frac = y[rows].mean(axis=1)
        assert np.mean((frac > 0.02) & (frac < 0.98)) >= 0.9, (name, frac)


def test_deterministic_and_jit_vmap_equal_a_python_loop(drawn):
    """A Python loop of eager `sample` calls (one key per family) gives the episodes of the
    fixture's jit(vmap(sample)); the same key gives the same episode, other keys others."""
    batched, *_, fam, _, s, keys = drawn
    for i in [int(np.flatnonzero(fam == f)[0]) for f in range(len(FAMILIES))]:
        eager = s.sample(keys[i])
        for name in ("support_x", "support_y", "query_x", "query_y"):
            a, c = np.asarray(getattr(eager, name)), getattr(batched, name)[i]
            assert a.dtype == c.dtype and a.shape == c.shape
            np.testing.assert_allclose(c, a, atol=1e-6, err_msg=f"{FAMILIES[fam[i]]} {name}")
    first, again = s.sample(keys[0]), s.sample(keys[0])
    for a, b in zip(first[:4], again[:4], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for j in range(1, 5):
        assert not np.allclose(batched.support_x[0], batched.support_x[j])


def test_two_families_each_episode_follows_exactly_one_rule():
    s = Functions2D(families=("xor", "or"), num_support=64, num_queries=64)
    eps = jax.jit(jax.vmap(s.sample))(jax.random.split(KEY, 48))
    x = np.concatenate([np.asarray(eps.support_x), np.asarray(eps.query_x)], axis=1)
    y = np.concatenate([np.asarray(eps.support_y), np.asarray(eps.query_y)], axis=1)
    seen = set()
    for xi, yi in zip(x, y, strict=True):
        match = [n for n in ("xor", "or") if np.array_equal(yi, fixed_rule(n, xi))]
        assert len(match) == 1, match
        seen.add(match[0])
    assert seen == {"xor", "or"}


def test_label_noise_flips_about_the_requested_fraction():
    s = Functions2D(families=("and",), num_support=256, num_queries=256, label_noise=0.2)
    eps = jax.jit(jax.vmap(s.sample))(jax.random.split(KEY, 16))
    x, y = np.asarray(eps.support_x).reshape(-1, 2), np.asarray(eps.support_y).ravel()
    clean = fixed_rule("and", x)
    flipped = y != clean
    assert 0.17 < flipped.mean() < 0.23  # 4096 labels: std of the rate about 0.006
    assert 0.14 < flipped[clean].mean() < 0.26 and 0.14 < flipped[~clean].mean() < 0.26


def test_families_as_string_or_list():
    assert Functions2D(families="circle, moons").families == ("circle", "moons")
    assert Functions2D(families=["xor"]).families == ("xor",)
    assert hash(Functions2D(families=["xor", "or"])) == hash(Functions2D())


@pytest.mark.parametrize("kwargs, field, shown", [
    ({"families": ("xor", "spiral")}, "families", "'spiral'"),
    ({"families": ()}, "families", "empty"),
    ({"families": ""}, "families", "empty"),
    ({"families": ("xor", "xor")}, "families", "'xor' more than once"),
    ({"families": 3}, "families", "got 3"),
    ({"num_support": 0}, "num_support", "got 0"),
    ({"num_queries": -2}, "num_queries", "got -2"),
    ({"num_support": 2.5}, "num_support", "got 2.5"),
    ({"input_range": 0.0}, "input_range", "got 0.0"),
    ({"input_range": float("inf")}, "input_range", "got inf"),
    ({"label_noise": 0.5}, "label_noise", "got 0.5"),
    ({"label_noise": -0.1}, "label_noise", "got -0.1"),
])
def test_bad_inputs_name_the_field(kwargs, field, shown):
    with pytest.raises(ValueError, match=field) as e:
        Functions2D(**kwargs)
    assert shown in str(e.value)
    if field == "families":
        assert "circle" in str(e.value)  # lists the valid choices
    else:
        assert "[" in str(e.value) or ">" in str(e.value)  # states the valid range

"""Synthetic 2-D binary classification tasks: families of decision rules on the plane.

A task family is a rule that labels a point x = (x0, x1) with 1 or 0; some families have
random parameters (a circle's centre and radius, a line's angle, ...) drawn afresh for every
episode. `Functions2D(families=("xor", "or"))` draws each episode's family uniformly from
`families`, then its parameters, then `num_support + num_queries` points and their labels, as
in the synthetic 2-D tasks of the BLUR paper (Sandler et al., 2021, "Meta-learning bidirectional
update rules"). Points are uniform on [-input_range, input_range]^2, except for "moons", whose
points lie on the two half-moons (in [-1, 1]^2 whatever `input_range`). The rules' random
parameters live in [-1, 1]^2 coordinates, so `input_range > 1` shows a task beyond the region
its boundary was drawn in.

    import jax
    from metalearn.tasks.functions2d import FAMILIES, Functions2D

    sampler = Functions2D(families="circle,stripe,moons", num_support=32, num_queries=32)
    ep = sampler.sample(jax.random.PRNGKey(0))          # x float32 [n, 2], y int32 in {0, 1}
    batch = jax.jit(sampler.sample_batch, static_argnums=1)(jax.random.PRNGKey(1), 64)

`FAMILY_DOCS` says what every family is; `FAMILIES` lists their names in a fixed order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import Array, Episode, TaskSampler
from metalearn.tasks.regression import _normal_from_uniform

FAMILY_DOCS: dict[str, str] = {
    "xor": "label 1 iff sign(x0) != sign(x1) (x0 * x1 > 0 is label 0)",
    "nxor": "the complement of xor: label 1 iff sign(x0) == sign(x1)",
    "or": "label 1 iff x0 > 0 or x1 > 0",
    "and": "label 1 iff x0 > 0 and x1 > 0",
    "qand": "label 1 iff x0 < 0 and x1 > 0 (the upper-left quadrant)",
    "nand": "label 1 iff not (x0 > 0 and x1 > 0)",
    "circle": "label 1 inside a circle with centre ~ U[-0.5, 0.5]^2 and radius ~ U(0.3, 0.7)",
    "moons": "two interleaving half-moons (sklearn make_moons: class 0 on the upper arc, class 1 "
             "on the lower shifted arc, Gaussian noise std 0.1 in make_moons units), centred, "
             "scaled by 1/1.6 to lie in the unit disc and rotated by a uniform angle; the class "
             "is drawn first (uniform), then the point on its moon",
    "random_linear": "label 1 on one side of a line through a point ~ U[-0.5, 0.5]^2 whose "
                     "normal has a uniform angle in [0, 2 pi)",
    "random_xor": "xor of z = R(t) (x - s): rotation by t ~ U[0, 2 pi), shift s ~ "
                  "U[-0.3, 0.3]^2",
    "square": "label 1 inside the square |x0| < a, |x1| < a with a ~ U(0.35, 0.75)",
    "stripe": "label 1 iff |x0 cos t + x1 sin t - c| < w with t ~ U[0, pi), c ~ U[-0.3, 0.3] "
              "and half-width w ~ U(0.2, 0.5)",
}
FAMILIES: tuple[str, ...] = tuple(FAMILY_DOCS)

# Every rule maps (x [n, 2] uniform points, p [4] and u [n, 4] U[0, 1) draws) to
# (x [n, 2], label [n] bool); only "moons" replaces the points (made from u).
_Rule = Callable[[Array, Array, Array], tuple[Array, Array]]
_MOONS_CENTRE = (0.5, 0.25)  # centre of make_moons' bounding box [-1, 2] x [-0.5, 1]
_MOONS_SCALE = 1.0 / 1.6  # noiseless moons reach 1.52 from the centre: inside the unit disc
_MOONS_NOISE = 0.1  # make_moons(noise=0.1), in make_moons units


def _rotate(x: Array, angle: Array) -> Array:
    """Points [n, 2] rotated counter-clockwise by `angle`."""
    c, s = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([c * x[:, 0] - s * x[:, 1], s * x[:, 0] + c * x[:, 1]], axis=-1)


def _xor(x: Array) -> Array:
    return (x[:, 0] > 0) != (x[:, 1] > 0)


def _fixed(rule: Callable[[Array], Array]) -> _Rule:
    return lambda x, p, u: (x, rule(x))


def _circle(x: Array, p: Array, u: Array) -> tuple[Array, Array]:
    centre, radius = p[:2] - 0.5, 0.3 + 0.4 * p[2]
    return x, jnp.sum((x - centre) ** 2, axis=-1) < radius**2


def _moons(x: Array, p: Array, u: Array) -> tuple[Array, Array]:
    label = u[:, 0] < 0.5
    t = math.pi * u[:, 1]
    upper = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=-1)
    lower = jnp.stack([1.0 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=-1)
    pts = jnp.where(label[:, None], lower, upper)
    pts = pts + _MOONS_NOISE * _normal_from_unit(u[:, 2:4])
    pts = (pts - jnp.asarray(_MOONS_CENTRE)) * _MOONS_SCALE
    return _rotate(pts, 2 * math.pi * p[0]).astype(x.dtype), label


def _normal_from_unit(u: Array) -> Array:
    """N(0, 1) draws from U[0, 1) ones (u = 0 maps to -5.4)."""
    lo = float(np.nextafter(np.float32(-1), np.float32(0)))
    return _normal_from_uniform(jnp.maximum(2.0 * u - 1.0, lo))


def _random_linear(x: Array, p: Array, u: Array) -> tuple[Array, Array]:
    point, angle = p[:2] - 0.5, 2 * math.pi * p[2]
    return x, (x - point) @ jnp.stack([jnp.cos(angle), jnp.sin(angle)]) > 0


def _random_xor(x: Array, p: Array, u: Array) -> tuple[Array, Array]:
    angle, shift = 2 * math.pi * p[0], 0.6 * p[1:3] - 0.3
    return x, _xor(_rotate(x - shift, angle))


def _square(x: Array, p: Array, u: Array) -> tuple[Array, Array]:
    a = 0.35 + 0.4 * p[0]
    return x, jnp.all(jnp.abs(x) < a, axis=-1)


def _stripe(x: Array, p: Array, u: Array) -> tuple[Array, Array]:
    t, c, w = math.pi * p[0], 0.6 * p[1] - 0.3, 0.2 + 0.3 * p[2]
    return x, jnp.abs(x[:, 0] * jnp.cos(t) + x[:, 1] * jnp.sin(t) - c) < w


_RULES: dict[str, _Rule] = {
    "xor": _fixed(_xor),
    "nxor": _fixed(lambda x: ~_xor(x)),
    "or": _fixed(lambda x: (x[:, 0] > 0) | (x[:, 1] > 0)),
    "and": _fixed(lambda x: (x[:, 0] > 0) & (x[:, 1] > 0)),
    "qand": _fixed(lambda x: (x[:, 0] < 0) & (x[:, 1] > 0)),
    "nand": _fixed(lambda x: ~((x[:, 0] > 0) & (x[:, 1] > 0))),
    "circle": _circle,
    "moons": _moons,
    "random_linear": _random_linear,
    "random_xor": _random_xor,
    "square": _square,
    "stripe": _stripe,
}
assert tuple(_RULES) == FAMILIES


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class Functions2D(TaskSampler):
    """Binary classification of points in the plane by a rule from one of `families`.

    Each episode: family ~ uniform over `families`, its parameters (if any), then
    `num_support + num_queries` points ~ U[-input_range, input_range]^2 (moons: on the moons)
    labelled by the rule, each label flipped with probability `label_noise`. `families` may be
    a tuple, a list or a comma-separated string ("xor,or"); see `FAMILY_DOCS`.

    All randomness is one flat draw u = uniform(key, (5 + 7 n,)) (n = num_support +
    num_queries) cut into disjoint, hence independent, slices: u[0] picks the family
    (floor(u[0] len(families))), u[1:5] are the parameters (mapped onto each family's ranges),
    u[5:5 + 6 n] is a block [n, 6] whose first two columns give the points
    x = input_range (2 u - 1) and whose other four give moons their class, arc position and
    Gaussian noise (inverse normal CDF), and u[5 + 6 n:] flips a label where < label_noise.
    One draw instead of a key split and four draws: the compiled sampler is about 4x quicker
    to build on CPU (every random op is a threefry hash, and XLA compiles each separately).
    """

    families: tuple[str, ...] = ("xor", "or")
    num_support: int = 64
    num_queries: int = 64
    input_range: float = 1.0
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        fams: Any = self.families
        if isinstance(fams, str):
            fams = tuple(f.strip() for f in fams.split(",") if f.strip())
        elif isinstance(fams, Sequence) and all(isinstance(f, str) for f in fams):
            fams = tuple(fams)
        else:
            raise ValueError(f"{name}.families must be a tuple or list of family names or a "
                             f"comma-separated string such as 'xor,or', got {fams!r}; choose "
                             f"from {', '.join(FAMILIES)}")
        if not fams:
            raise ValueError(f"{name}.families is empty ({self.families!r}); give at least one "
                             f"of {', '.join(FAMILIES)}")
        unknown = [f for f in fams if f not in FAMILY_DOCS]
        if unknown:
            raise ValueError(f"{name}.families has unknown family name(s) "
                             f"{', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(FAMILIES)}")
        dups = sorted({f for f in fams if fams.count(f) > 1})
        if dups:
            raise ValueError(f"{name}.families lists {', '.join(map(repr, dups))} more than "
                             f"once ({fams!r}); families are drawn uniformly, so name each "
                             f"family once, from {', '.join(FAMILIES)}")
        object.__setattr__(self, "families", fams)
        for f in ("num_support", "num_queries"):
            v = getattr(self, f)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name}.{f} must be an integer >= 1, got {v!r}")
        r = self.input_range
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"{name}.input_range must be a finite number > 0 (points are "
                             f"drawn from U(-input_range, input_range)^2), got {r!r}")
        q = self.label_noise
        if not _is_real(q) or not 0 <= q < 0.5:
            raise ValueError(f"{name}.label_noise is the probability of flipping each label "
                             f"and must lie in [0, 0.5), got {q!r}")

    def _draw(self, key: Array) -> Array:
        """The one flat U[0, 1) draw every random choice of `sample(key)` is cut from."""
        return jax.random.uniform(key, (5 + 7 * (self.num_support + self.num_queries),),
                                  jnp.float32)

    def _index(self, u0: Array) -> Array:
        k = len(self.families)
        return jnp.minimum(jnp.floor(u0 * k).astype(jnp.int32), k - 1)

    def family_index(self, key: Array) -> Array:
        """Index into `families` of the family that `sample(key)` draws (int32 scalar)."""
        return self._index(self._draw(key)[0])

    def sample(self, key: Array) -> Episode:
        """One episode: support and query points labelled by one random rule of `families`."""
        n = self.num_support + self.num_queries
        u = self._draw(key)
        p, block, noise = u[1:5], u[5:5 + 6 * n].reshape(n, 6), u[5 + 6 * n:]
        x = self.input_range * (2.0 * block[:, :2] - 1.0)
        branches = [_RULES[f] for f in self.families]
        x, label = jax.lax.switch(self._index(u[0]), branches, x, p, block[:, 2:])
        if self.label_noise > 0:
            label = label != (noise < self.label_noise)
        y = label.astype(jnp.int32)
        s = self.num_support
        return Episode(x[:s], y[:s], x[s:], y[s:])

    def describe(self) -> dict:
        """Config of the task distribution (JSON-able)."""
        return {"sampler": type(self).__name__, "families": list(self.families),
                "num_support": self.num_support, "num_queries": self.num_queries,
                "input_range": float(self.input_range), "label_noise": float(self.label_noise)}

"""Random affine distortions of few-shot images, on device (Koch, Zemel, Salakhutdinov 2015).

Each image (or, with `per_class`, each class of an episode: one transform shared by all its
images, which makes a new class) gets a random affine map T = R(theta) Sh(rho_r, rho_c)
S(s_r, s_c) plus a translation (t_r, t_c), about the image centre. Koch et al. drew, for
Omniglot's 105x105 images, theta in [-10, 10] degrees, rho in [-0.3, 0.3], s in [0.8, 1.2]
and t in [-2, 2] pixels, each component applied with probability 0.5; those are the defaults
here, the translation as a fraction of the image side (2/105). Output pixel q reads the input
at T^-1 (q - centre - t) + centre by bilinear interpolation, edge pixels extended beyond the
border (the background for Omniglot's white margins).

The parameters are drawn by `sample_params` from a key (part of `FewShotSampler.sample_indices`,
so an episode's images are a pure function of its key) and applied by `warp`. Identity
parameters give the input back exactly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metalearn.core import Array

# one row of parameters per image: rotation (radians), shear (rows, cols), scale (rows, cols),
# translation (rows, cols; fraction of the side)
NUM_PARAMS = 7
IDENTITY = (0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Ranges of the random affine distortion; `strength` scales them all (0: identity)."""

    rotation_deg: float = 10.0  # theta ~ U[-r, r] degrees
    shear: float = 0.3  # rho_r, rho_c ~ U[-s, s]
    scale: float = 0.2  # s_r, s_c ~ U[1 - s, 1 + s]
    translate: float = 2 / 105  # t_r, t_c ~ U[-t, t] x the image side
    prob: float = 0.5  # each component is applied with this probability (Koch et al.)
    per_class: bool = False  # one transform per class of the episode instead of per image
    strength: float = 1.0

    def __post_init__(self) -> None:
        for f in ("rotation_deg", "shear", "scale", "translate", "strength"):
            if getattr(self, f) < 0:
                raise ValueError(f"Augment.{f} must be >= 0, got {getattr(self, f)!r}")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"Augment.prob must lie in [0, 1], got {self.prob!r}")
        if self.scale * self.strength >= 1:
            raise ValueError(f"Augment.scale x strength must be < 1 (a scale factor of "
                             f"1 - {self.scale * self.strength:g} would flip or collapse the "
                             "image); lower scale or strength")


def from_setting(mode: str, strength: float = 1.0) -> Augment | None:
    """The `task.augment` config value: 'none', 'image' (per image) or 'class' (per class)."""
    if mode in ("none", "", None, False):
        return None
    if mode not in ("image", "class"):
        raise ValueError(f"task.augment={mode!r}: use none, image (a random affine distortion "
                         "per image) or class (one per class of the episode)")
    return Augment(per_class=mode == "class", strength=float(strength))


def sample_params(key: Array, n: int, aug: Augment) -> Array:
    """float32 [n, NUM_PARAMS]: `n` random transforms drawn from `aug`'s ranges."""
    k_val, k_on = jax.random.split(key)
    u = jax.random.uniform(k_val, (n, 4, 2), minval=-1.0, maxval=1.0) * aug.strength
    on = jax.random.bernoulli(k_on, aug.prob, (n, 4, 1))
    u = jnp.where(on, u, 0.0)
    theta = u[:, 0, :1] * jnp.deg2rad(aug.rotation_deg)
    return jnp.concatenate([theta, u[:, 1] * aug.shear, 1 + u[:, 2] * aug.scale,
                            u[:, 3] * aug.translate], axis=1)


def _inverse_maps(params: Array) -> tuple[Array, Array]:
    """(T^-1 [n, 2, 2], t [n, 2]) of each parameter row, in (row, column) pixel coordinates."""
    theta, rho, s, t = params[:, 0], params[:, 1:3], params[:, 3:5], params[:, 5:7]
    c, si = jnp.cos(theta), jnp.sin(theta)
    rot = jnp.stack([jnp.stack([c, -si], -1), jnp.stack([si, c], -1)], -2)
    one = jnp.ones_like(theta)
    shear = jnp.stack([jnp.stack([one, rho[:, 0]], -1), jnp.stack([rho[:, 1], one], -1)], -2)
    fwd = rot @ shear * s[:, None, :]  # R Sh S: columns scaled
    a, b, cc, d = fwd[:, 0, 0], fwd[:, 0, 1], fwd[:, 1, 0], fwd[:, 1, 1]
    det = a * d - b * cc
    inv = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-cc, a], -1)], -2) / det[:, None, None]
    return inv, t


def source_coords(params: Array, h: int, w: int) -> Array:
    """float32 [n, 2, H, W]: where each output pixel reads the input (row, column)."""
    inv, t = _inverse_maps(params)
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
    rows = jnp.arange(h, dtype=jnp.float32) - centre[0]
    cols = jnp.arange(w, dtype=jnp.float32) - centre[1]
    # T^-1 (q - centre - t) + centre, written out: an einsum over the 2x2 maps was 2x slower
    off = centre - jnp.einsum("nij,nj->ni", inv, t * jnp.array([h, w], jnp.float32))
    return (inv[:, :, 0, None, None] * rows[:, None] + inv[:, :, 1, None, None] * cols
            + off[:, :, None, None])


def warp(images: Array, params: Array) -> Array:
    """`images` [n, H, W, C] (float) under the transforms `params` [n, NUM_PARAMS].

    Bilinear interpolation with the edge pixels extended (`scipy.ndimage`'s order=1,
    mode="nearest", which the tests compare it with), written as four gathers from each
    flattened image: 3x as fast as vmapping `jax.scipy.ndimage.map_coordinates` over images and
    channels (61 vs 176 ms for 10,240 28x28 images, measured with a training run beside it)."""
    n, h, w, ch = images.shape
    if h < 2 or w < 2:
        raise ValueError(f"augmentation needs images of at least 2x2 pixels, got {h}x{w}")
    src = source_coords(params, h, w)
    y, x = jnp.clip(src[:, 0], 0, h - 1), jnp.clip(src[:, 1], 0, w - 1)
    y0, x0 = jnp.minimum(jnp.floor(y), h - 2), jnp.minimum(jnp.floor(x), w - 2)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    corner = (y0 * w + x0).astype(jnp.int32).reshape(n, h * w, 1)
    flat = images.reshape(n, h * w, ch)
    at = lambda d: jnp.take_along_axis(flat, corner + d, axis=1,
                                       mode="promise_in_bounds").reshape(n, h, w, ch)
    return (1 - wy) * ((1 - wx) * at(0) + wx * at(1)) + wy * ((1 - wx) * at(w) + wx * at(w + 1))

"""Learned optimizers over gradients: a small MLP, applied to every parameter, writes its update.

The inner problem is the Hebbian genome's (`metalearn.learners.network.Network`): a fully
connected network drawn fresh per episode (same layers, activations, initial weights, batches)
and trained for `inner_steps` steps on the support set's batch-mean 1/2 squared error to the
target codes; its queries are then scored by `meta_loss`. Instead of the genome's Hebbian
rule, step t updates every parameter p from features of its own gradient history:

    (d, a) = MLP_phi(features(p)),     p <- p - d * exp(a * exp_mult) * step_mult,

phi (the MLP's weights, shared by all parameters of every layer) being the meta-parameters.

`MLPLOpt` (Metz et al. 2019, "Understanding and correcting pathologies in the training of
learned optimizers"; learned_optimization's `MLPLOpt`): 19 features per parameter, the gradient
g, the parameter p and momenta m_beta <- beta m_beta + (1 - beta) g at beta in {0.1, 0.5, 0.9,
0.99, 0.999, 0.9999} (no bias correction), each of these 8 normalised per tensor by its second
moment, x / sqrt(1e-5 + mean_tensor(x^2)), and 11 step features tanh(t / tau - 1), tau in
{1, 3, 10, ..., 1e5}; an MLP of 2 hidden layers of 32 ReLU units: 1,762 meta-parameters.

`AdafacLOpt`, a small factored variant in the spirit of `AdafacMLPLOpt`: momenta at {0.9, 0.99,
0.999}, a second-moment accumulator v (0.999) and, for matrices, Adafactor's row and column
accumulators r, c (0.999) with the factored estimate v_f = r c^T / mean(r) (v itself for
vectors). Features: g, p, m (3), sqrt(v), m / sqrt(v) (3), 1 / sqrt(v), g / sqrt(v_f),
m / sqrt(v_f) (3) (accumulators bias-free, 1e-8 under every root), each second-moment normalised
per tensor, and the 11 step features: 25 inputs, 2 hidden layers of 4: 134 meta-parameters, a
size CMA-ES handles (the genome has 20).

`start="sgd"` (default) writes, over the random initial MLP, a path that makes d the first
normalised feature (the gradient) and a = 0: each starts as normalised-gradient descent at
`step_mult` (hidden units 0 and 1 carry relu(g) and relu(-g) and the output subtracts them), a
working optimizer to improve rather than a random one (as the genome starts from its gradient
genome). `start="adam"` (AdafacLOpt) writes the same path from its feature m_0.9 / sqrt(v):
the rule starts as Adam's direction (bias-free, normalised per tensor) at `step_mult`, so
meta-training starts near Adam instead of first having to find it (whether it then gets past
Adam depends on the meta-loss: docs/lopt.md). `start="random"`: the MLP alone, as
learned_optimization initialises it.

Options for long and unstable inner runs: `max_offset` draws each episode's step counter from
[0, max_offset) (the step features only), so tasks do not run in lock step
(`random_initial_iteration_offset`); a query meta-loss that is NaN or infinite (a diverged
inner run) is replaced by `loss_cap` and gradients through it are zero, so one diverged episode
neither makes a meta-gradient NaN nor an evolution fitness unbounded. `score_steps` (from
`Network`) scores the queries after several step counts, e.g. (T, 10T), and meta-trains on the
mean, so that the rule is also judged where it runs past its unroll.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.core import Array, Episode, MetaParams, PyTree
from metalearn.learners.network import Network
from metalearn.nn import dense, init_dense

TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
INITS = ("sgd", "adam", "random")
FUSED_WIDTH = 8  # MLPs up to this wide run as fused elementwise sums (`mlp_of`)


def time_features(t: Array) -> Array:
    """The 11 step features tanh(t / tau - 1)."""
    return jnp.tanh(jnp.asarray(t, jnp.float32) / jnp.asarray(TIME_SCALES) - 1.0)


NORM_EPS = 1e-5


def second_moment_normalize(x: Array, eps: float = NORM_EPS) -> Array:
    """x / sqrt(eps + mean(x^2)) over the whole tensor (learned_optimization's normaliser)."""
    return x * feature_scales([x], eps)[0]


def second_moments(xs: list[Array]) -> Array:
    """[mean(x^2) for x in xs] (arrays of one shape) as one reduction, so XLA reads the
    arrays' inputs once instead of writing and reading each x."""
    sums = jax.lax.reduce([jnp.square(x) for x in xs], [jnp.zeros((), xs[0].dtype)] * len(xs),
                          lambda a, b: [u + v for u, v in zip(a, b, strict=True)],
                          tuple(range(xs[0].ndim)))
    return jnp.stack(sums) / xs[0].size


def feature_scales(xs: list[Array], eps: float = NORM_EPS) -> Array:
    """[1 / sqrt(eps + mean(x^2)) for x in xs]: what `second_moment_normalize` multiplies by."""
    return jax.lax.rsqrt(eps + second_moments(xs))


@dataclasses.dataclass(frozen=True)
class _LearnedOptimizer(Network):
    """A per-parameter MLP optimizer on the `Network` inner problem; subclasses define the
    accumulators (`init_accumulators`, `accumulate`) and the features they give."""

    hidden_size: int = 32
    hidden_layers: int = 2
    step_mult: float = 1e-3
    exp_mult: float = 1e-3
    start: str = "sgd"  # the MLP starts as normalised-gradient descent (sgd) or random
    max_offset: int = 0  # step counters start in [0, max_offset) per episode (0: at 0)
    loss_cap: float = 10.0  # a NaN/inf query meta-loss becomes this

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.start == "adam" and self.adam_feature is None:
            raise ValueError(f"{name}.start='adam' needs an m / sqrt(v) feature, which {name} "
                             "does not have; use start='sgd' or AdafacLOpt")
        if self.hidden_size < 2 or self.hidden_layers < 1:
            raise ValueError(f"{name} needs hidden_size >= 2 and hidden_layers >= 1, got "
                             f"{self.hidden_size}, {self.hidden_layers}")
        if self.start not in INITS:
            raise ValueError(f"{name}.start={self.start!r}: use sgd (start as normalised-"
                             "gradient descent), adam (as normalised m / sqrt(v)) or random")
        if self.max_offset < 0 or not self.step_mult > 0 or not self.loss_cap > 0:
            raise ValueError(f"{name} needs max_offset >= 0, step_mult > 0 and loss_cap > 0")

    # ----- what a subclass defines
    num_features: ClassVar[int] = 0  # per-tensor features (the 11 step features come on top)
    adam_feature: ClassVar[int | None] = None  # index of m_0.9 / sqrt(v), if a feature

    def init_accumulators(self, p: Array) -> PyTree:
        """The accumulators of one parameter tensor, at the start of training."""
        raise NotImplementedError

    def accumulate(self, acc: PyTree, g: Array) -> PyTree:
        """The accumulators after gradient g."""
        raise NotImplementedError

    def raw_features(self, p: Array, g: Array, acc: PyTree) -> list[Array]:
        """The F per-parameter features of one tensor (gradient first) before their per-tensor
        normalisation, each shaped as p."""
        raise NotImplementedError

    def feature_list(self, p: Array, g: Array, acc: PyTree) -> list[Array]:
        """The F features, each second-moment normalised per tensor."""
        raw = self.raw_features(p, g, acc)
        return [x * s for x, s in zip(raw, feature_scales(raw), strict=True)]

    def tensor_features(self, p: Array, g: Array, acc: PyTree) -> Array:
        """The features stacked: [*p.shape, F]."""
        return jnp.stack(self.feature_list(p, g, acc), axis=-1)

    # ----- the optimizer
    def init(self, key: Array, example: Episode) -> MetaParams:
        """The MLP's weights (with the path from the gradient, or from m / sqrt(v), to d when
        `start` is sgd or adam)."""
        self.check_episode(example)
        sizes = [self.num_features + len(TIME_SCALES)] + [self.hidden_size] * \
            self.hidden_layers + [2]
        keys = jax.random.split(key, len(sizes) - 1)
        layers = [init_dense(k, a, b) for k, a, b in zip(keys, sizes[:-1], sizes[1:],
                                                           strict=True)]
        if self.start != "random":
            src = 0 if self.start == "sgd" else self.adam_feature  # the feature d starts as
            for i, lay in enumerate(layers):
                w = lay["w"]
                if i == 0:  # units 0, 1 <- relu(+f), relu(-f)
                    w = w.at[:, :2].set(0.0).at[src, 0].set(1.0).at[src, 1].set(-1.0)
                elif i < len(layers) - 1:  # pass them on
                    w = w.at[:, :2].set(0.0).at[:2, :].set(0.0).at[0, 0].set(1.0) \
                        .at[1, 1].set(1.0)
                else:  # d = unit 0 - unit 1 = f, a = 0
                    w = w.at[:2, :].set(0.0).at[:, :].set(0.0).at[0, 0].set(1.0) \
                        .at[1, 0].set(-1.0)
                layers[i] = {"w": w, "b": jnp.zeros_like(lay["b"])}
        return {"mlp": layers}

    def mlp(self, meta: MetaParams, feats: Array) -> tuple[Array, Array]:
        """(d, a) for features [..., F]."""
        shape = feats.shape[:-1]
        h = feats.reshape(-1, feats.shape[-1])
        layers = meta["mlp"]
        for lay in layers[:-1]:
            h = jax.nn.relu(dense(lay, h))
        out = dense(layers[-1], h).reshape(*shape, 2)
        return out[..., 0], out[..., 1]

    def step(self, meta: MetaParams, p: Array, g: Array, acc: PyTree, t: Array
             ) -> tuple[Array, PyTree]:
        """One tensor's update: the accumulators after g, then p - d exp(a c1) c2."""
        acc = self.accumulate(acc, g)
        raw = self.raw_features(p, g, acc)
        d, a = self.mlp_of(meta, raw, time_features(t), feature_scales(raw))
        return p - d * jnp.exp(a * self.exp_mult) * self.step_mult, acc

    def mlp_of(self, meta: MetaParams, feats: list[Array], tf: Array,
               scales: Array | None = None) -> tuple[Array, Array]:
        """`mlp` of every parameter's inputs [s_1 f_1 .. s_F f_F, tf] (tf: the step features,
        the same for every parameter; s: per-tensor feature scales, 1 if None), computed
        without the [*p.shape, F + 11] input array: s is folded into the first layer's
        weights and tf's first-layer product is one bias (both per tensor, not per
        parameter), and a narrow MLP runs as fused elementwise sums (XLA's CPU matrix product
        is slow at inner sizes of a few units), a wide one as products with the parameters on
        the long axis."""
        layers, n = meta["mlp"], len(feats)
        w0 = layers[0]["w"]
        bias = tf @ w0[n:] + layers[0]["b"]
        w0 = w0[:n] if scales is None else w0[:n] * scales[:, None]
        if self.hidden_size <= FUSED_WIDTH:
            def layer(x: list[Array], w: Array, b: Array) -> list[Array]:
                return [sum(xk * w[k, j] for k, xk in enumerate(x)) + b[j]
                        for j in range(w.shape[1])]

            h = [jax.nn.relu(u) for u in layer(feats, w0, bias)]
            for lay in layers[1:-1]:
                h = [jax.nn.relu(u) for u in layer(h, lay["w"], lay["b"])]
            d, a = layer(h, layers[-1]["w"], layers[-1]["b"])
            return d, a
        x = jnp.stack([f.reshape(-1) for f in feats])  # [F, parameters]
        h = jax.nn.relu(w0.T @ x + bias[:, None])
        for lay in layers[1:-1]:
            h = jax.nn.relu(lay["w"].T @ h + lay["b"][:, None])
        out = layers[-1]["w"].T @ h + layers[-1]["b"][:, None]
        return out[0].reshape(feats[0].shape), out[1].reshape(feats[0].shape)

    # ----- the Network contract
    def init_state(self, meta: MetaParams, key: Array, d_in: int) -> tuple:
        """Weights [n_c + 1, n_{c+1}] (bias last row), accumulators, the step offset."""
        k_w, k_off = jax.random.split(key)
        w = [s["F"][0] for s in self.synapses(k_w, d_in)]
        offset = jax.random.randint(k_off, (), 0, self.max_offset) if self.max_offset \
            else jnp.zeros((), jnp.int32)
        return w, [self.init_accumulators(p) for p in w], offset

    def outputs(self, meta: MetaParams, state: tuple, x: Array) -> Array:
        """The MLP's outputs [B, ways]."""
        return self.mlp_outputs(state[0], x)

    def update(self, meta: MetaParams, state: tuple, x: Array, y: Array, t: Array) -> tuple:
        """One learned-optimizer step on the batch."""
        w, acc, offset = state
        g = jax.grad(self.train_loss)(w, x, y)
        new = [self.step(meta, p, gi, a, t + offset) for p, gi, a in zip(w, g, acc,
                                                                         strict=True)]
        return [n[0] for n in new], [n[1] for n in new], offset

    def loss(self, meta: MetaParams, episode: Episode, key: Array) -> tuple[Array, dict]:
        """The query meta-loss; `loss_cap`, with zero meta-gradient, where it is NaN or
        infinite (`_guarded`)."""
        return _guarded(super().loss, self.loss_cap, meta, episode, key)


def _zero_cotangent(a: Array) -> Array:
    a = jnp.asarray(a)
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


def _guarded(loss_fn, cap: float, meta: MetaParams, episode: Episode, key: Array
             ) -> tuple[Array, dict]:
    """`loss_fn(meta, episode, key)` with a non-finite loss replaced by `cap` and its
    meta-gradient by zero. A where() alone is not enough: the backward pass of a diverged inner
    run multiplies the zero cotangent by infinite partials (0 x inf = NaN), so the guard sits
    on the vector-Jacobian product itself, per episode."""

    @jax.custom_vjp
    def run(m: MetaParams, e: Episode, k: Array) -> tuple[Array, dict]:
        loss, metrics = loss_fn(m, e, k)
        ok = jnp.isfinite(loss)
        return jnp.where(ok, loss, cap), {**metrics, "loss": jnp.where(ok, loss, cap)}

    def fwd(m: MetaParams, e: Episode, k: Array):
        (loss, metrics), vjp = jax.vjp(lambda mm: loss_fn(mm, e, k), m)
        ok = jnp.isfinite(loss)
        out = jnp.where(ok, loss, cap)
        return (out, {**metrics, "loss": out}), (vjp, ok, e, k)

    def bwd(res, ct):
        vjp, ok, e, k = res
        ct_loss, ct_metrics = ct
        (g,) = vjp((ct_loss + ct_metrics["loss"],
                    {n: jnp.zeros_like(v) if n != "loss" else ct_metrics["loss"] * 0
                     for n, v in ct_metrics.items()}))
        g = jax.tree.map(lambda a: jnp.where(ok & jnp.isfinite(a), a, 0.0), g)
        return g, jax.tree.map(_zero_cotangent, e), _zero_cotangent(k)

    run.defvjp(fwd, bwd)
    return run(meta, episode, key)


MLP_DECAYS = (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)


@dataclasses.dataclass(frozen=True)
class MLPLOpt(_LearnedOptimizer):
    """Metz et al.'s per-parameter MLP optimizer: g, p, 6 momenta, 11 step features."""

    num_features: ClassVar[int] = 2 + len(MLP_DECAYS)

    def init_accumulators(self, p: Array) -> Array:
        """Momenta [6, *p.shape], zero."""
        return jnp.zeros((len(MLP_DECAYS), *p.shape), p.dtype)

    def accumulate(self, acc: Array, g: Array) -> Array:
        """m_beta <- beta m_beta + (1 - beta) g."""
        b = jnp.asarray(MLP_DECAYS, g.dtype).reshape(-1, *([1] * g.ndim))
        return b * acc + (1 - b) * g[None]

    def raw_features(self, p: Array, g: Array, acc: Array) -> list[Array]:
        """g, p, m_0.1 .. m_0.9999."""
        return [g, p, *acc]


ADAFAC_MOMENTA = (0.9, 0.99, 0.999)
ADAFAC_RMS = 0.999
ROOT_EPS = 1e-8


@dataclasses.dataclass(frozen=True)
class AdafacLOpt(_LearnedOptimizer):
    """A small factored per-parameter MLP optimizer (Adafactor-style accumulators, 2 x 4)."""

    hidden_size: int = 4
    num_features: ClassVar[int] = 14
    adam_feature: ClassVar[int | None] = 6

    def init_accumulators(self, p: Array) -> dict:
        """Momenta, v, and row/column accumulators (matrices) at zero; a step count."""
        acc = {"m": jnp.zeros((len(ADAFAC_MOMENTA), *p.shape), p.dtype),
               "v": jnp.zeros_like(p)}
        if p.ndim == 2:
            acc["r"], acc["c"] = jnp.zeros(p.shape[0], p.dtype), jnp.zeros(p.shape[1], p.dtype)
        return acc

    def accumulate(self, acc: dict, g: Array) -> dict:
        """Momenta, v <- 0.999 v + 0.001 g^2, r and c the same on row and column means."""
        b = jnp.asarray(ADAFAC_MOMENTA, g.dtype).reshape(-1, *([1] * g.ndim))
        out = {"m": b * acc["m"] + (1 - b) * g[None],
               "v": ADAFAC_RMS * acc["v"] + (1 - ADAFAC_RMS) * g * g}
        if "r" in acc:
            g2 = g * g
            out["r"] = ADAFAC_RMS * acc["r"] + (1 - ADAFAC_RMS) * jnp.mean(g2, axis=1)
            out["c"] = ADAFAC_RMS * acc["c"] + (1 - ADAFAC_RMS) * jnp.mean(g2, axis=0)
        return out

    def raw_features(self, p: Array, g: Array, acc: dict) -> list[Array]:
        """The 14 features of the module docstring."""
        m, v = acc["m"], acc["v"]
        rs = jax.lax.rsqrt(v + ROOT_EPS)
        if "r" in acc:
            vf = acc["r"][:, None] * acc["c"][None, :] / (jnp.mean(acc["r"]) + ROOT_EPS)
        else:
            vf = v
        rf = jax.lax.rsqrt(vf + ROOT_EPS)
        return [g, p, *m, jnp.sqrt(v + ROOT_EPS), *(m * rs[None]), rs, g * rf, *(m * rf[None])]

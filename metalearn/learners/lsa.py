"""Linear self-attention (LSA) learners that learn in context (von Oswald et al., ICML 2023).

Tokens are e_i = (x_i, y_i) for the N context pairs and (x_q, 0) for each query; a stack of
(linear or softmax) self-attention layers updates every token, e_j <- e_j + sum_h P_h V_h K_h^T
q_{h,j}, where keys and values come from the context tokens only, so that the queries of one
episode never see each other (Q queries in one sequence == Q sequences of one query). The
prediction is minus the query token's y entry after the last layer.

`gd_construction` gives the paper's weights (Proposition 1): W_K = W_Q = [[I, 0], [0, 0]],
P W_V = -diag(gamma/N I, eta/N I); one such layer is one gradient-descent step with learning rate
eta on L(W) = 1/(2N) sum_i ||W x_i - y_i||^2 from W_0 = 0, K layers are K steps, and gamma > 0
adds the GD++ input transform x_j <- (I - gamma X^T X / N) x_j.

Weights are stored in row-vector form (tokens are rows, `e @ W`), one array per role with a
leading head axis: query/key/value [H, D, K], proj [H, K, D], D = d + dy (or embed_size + dy);
without weight tying every leaf has an extra leading layer axis [L, ...].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from metalearn import nn
from metalearn.core import Array, Episode, InnerLearner, MetaParams, Support

ROLES = ("query", "key", "value", "proj")


def _dims(example: Episode, embed_size: int) -> tuple[int, int, int]:
    """(input features d, target width dy, token width D) of an example episode."""
    if example.is_classification:
        raise ValueError("LSA is a regression learner: support_y must be float targets [S, dy]")
    d = int(math.prod(example.support_x.shape[1:]))
    dy = int(example.support_y.shape[-1]) if example.support_y.ndim > 1 else 1
    return d, dy, (embed_size or d) + dy


def attention_products(p: dict) -> tuple[Array, Array]:
    """Per-head products A_h = W_Q W_K^T and B_h = W_V P (row form), each [H, D, D]."""
    a = jnp.einsum("hdk,hek->hde", p["query"], p["key"])
    b = jnp.einsum("hdk,hke->hde", p["value"], p["proj"])
    return a, b


def attention_layer(p: dict, h: Array, num_context: int, *, softmax: bool = False,
                    layer_norm: bool = False, queries_only: bool = False,
                    last_cols: int = 0) -> Array:
    """One residual self-attention layer on tokens h [T, D]; keys/values are h[:num_context].

    Linear attention computes sum_i (h_j W_Q W_K^T c_i^T) c_i W_V P with the weight products
    formed first (one large matrix product per role over a vmapped batch of episodes). With
    `queries_only` only the tokens after the context are updated and returned (enough for the
    last layer, since the context never attends to the queries); with `last_cols` > 0 only
    their last `last_cols` channels (the y entries read by the prediction).
    """
    hn = nn.layer_norm(h, p["ln_scale"], p["ln_offset"]) if layer_norm else h
    ctx = hn[:num_context]
    tgt = hn[num_context:] if queries_only else hn
    cols = slice(h.shape[-1] - last_cols if last_cols else 0, h.shape[-1])
    if softmax:
        q = jnp.einsum("td,hdk->htk", tgt, p["query"])
        k = jnp.einsum("nd,hdk->hnk", ctx, p["key"])
        v = jnp.einsum("nd,hdk->hnk", ctx, p["value"])
        w = jax.nn.softmax(jnp.einsum("htk,hnk->htn", q, k) / math.sqrt(q.shape[-1]), axis=-1)
        out = jnp.einsum("htn,hnk,hke->te", w, v, p["proj"][..., cols])
    else:
        a, b = attention_products(p)
        u = jnp.einsum("td,hde->hte", tgt, a)
        v = jnp.einsum("nd,hde->hne", ctx, b[..., cols])
        w = jnp.einsum("hte,ne->htn", u, ctx)
        out = jnp.einsum("htn,hne->te", w, v)
    return (h[num_context:] if queries_only else h)[:, cols] + out


def _mlp_embed(p: dict, x: Array) -> Array:
    """phi(x) = z + W2 gelu(W1 z + b1) + b2 with z = W_e x + b_e (the non-linear regression MLP)."""
    z = x @ p["w_in"] + p["b_in"]
    return z + jax.nn.gelu(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@dataclasses.dataclass(frozen=True)
class LSA(InnerLearner):
    """A stack of (linear) self-attention layers that predicts each query from the context.

    num_layers: attention layers; recurrent: one weight-tied layer applied num_layers times;
    num_heads / key_size: heads and their width (default D); softmax: softmax attention instead
    of linear; layer_norm: pre-attention LayerNorm; embed_size > 0: tokens (phi(x), y) with an
    MLP embedding phi of x (for non-linear regression); init_scale: VarianceScaling scale, divided
    by num_layers as in the paper's code. gd_attention: the attention is fixed to the GD
    construction and only its learning rate (meta["eta"]) and the embedding are learned, i.e.
    gradient descent on learned features (the paper's "MLP + GD" baseline).
    """

    num_layers: int = 1
    recurrent: bool = True
    num_heads: int = 1
    key_size: int = 0
    softmax: bool = False
    layer_norm: bool = False
    embed_size: int = 0
    mlp_widening: int = 4
    init_scale: float = 0.002
    gd_attention: bool = False

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_heads"):
            if getattr(self, f) < 1:
                raise ValueError(f"LSA.{f} must be >= 1, got {getattr(self, f)}")
        if self.key_size < 0 or self.embed_size < 0:
            raise ValueError("LSA.key_size and LSA.embed_size must be >= 0 (0 = default)")
        if self.gd_attention and (self.softmax or self.layer_norm or self.num_heads != 1):
            raise ValueError("LSA.gd_attention is the linear 1-head GD construction: it cannot be "
                             "combined with softmax, layer_norm or several heads")

    @property
    def _stack(self) -> int:
        return 1 if self.recurrent else self.num_layers

    def init(self, key: Array, example: Episode) -> MetaParams:
        """Attention weights ~ VarianceScaling(init_scale / num_layers) (+ LayerNorm, embedding)."""
        d, dy, dd = _dims(example, self.embed_size)
        kk, hh = self.key_size or dd, self.num_heads
        vs = jax.nn.initializers.variance_scaling(self.init_scale / self.num_layers, "fan_in",
                                                  "truncated_normal")
        keys = iter(jax.random.split(key, 4 * self._stack + 3))

        def layer() -> dict:
            p = {r: vs(next(keys), (dd, hh * kk)).reshape(dd, hh, kk).transpose(1, 0, 2)
                 for r in ROLES[:3]}
            p["proj"] = vs(next(keys), (hh * kk, dd)).reshape(hh, kk, dd)
            if self.layer_norm:
                p["ln_scale"], p["ln_offset"] = jnp.ones(dd), jnp.zeros(dd)
            return p

        if self.gd_attention:
            params = {"eta": jnp.asarray(1.0, jnp.float32)}
        else:
            layers = [layer() for _ in range(self._stack)]
            params = {"attn": layers[0] if self.recurrent else
                      jax.tree.map(lambda *a: jnp.stack(a), *layers)}
        if self.embed_size:
            e, w = self.embed_size, self.embed_size * self.mlp_widening
            dense = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            params["embed"] = {"w_in": dense(next(keys), (d, e)), "b_in": jnp.zeros(e),
                               "w1": dense(next(keys), (e, w)), "b1": jnp.zeros(w),
                               "w2": dense(next(keys), (w, e)), "b2": jnp.zeros(e)}
        return params

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> Support:
        """In-context learning happens in `predict`: the task state is the context itself."""
        return support

    def layer_params(self, meta: MetaParams, layer: int, width: int = 0, dim_out: int = 1,
                     num_context: int = 1) -> dict:
        """The attention weights of layer `layer` (shared when recurrent); with `gd_attention`
        the construction for tokens of `width` channels, the last `dim_out` the targets."""
        if self.gd_attention:
            return gd_construction(width - dim_out, dim_out, meta["eta"], num_context)["attn"]
        if self.recurrent:
            return meta["attn"]
        return jax.tree.map(lambda a: a[layer], meta["attn"])

    def features(self, meta: MetaParams, x: Array) -> Array:
        """x [n, ...] -> the token's input part [n, d] (phi(x) with the MLP embedding)."""
        x = x.reshape(x.shape[0], -1)
        return _mlp_embed(meta["embed"], x) if self.embed_size else x

    def tokens(self, meta: MetaParams, support: Support, query_x: Array) -> Array:
        """[N + Q, D] tokens: (x_i, y_i) for the context, (x_q, 0) for the queries."""
        sy = support.y.reshape(support.y.shape[0], -1)
        ctx = jnp.concatenate([self.features(meta, support.x), sy], axis=-1)
        fq = self.features(meta, query_x)
        qry = jnp.concatenate([fq, jnp.zeros((fq.shape[0], sy.shape[1]), fq.dtype)], axis=-1)
        return jnp.concatenate([ctx, qry], axis=0)

    def forward(self, meta: MetaParams, h: Array, num_context: int, queries_only: bool = True,
                last_cols: int = 0, dim_out: int = 1) -> Array:
        """Run the layers on tokens h [N + Q, D] whose last `dim_out` channels are targets.

        Returns the query tokens (or all tokens); with `last_cols` > 0 only the last layer's
        last `last_cols` channels of the queries.
        """
        for i in range(self.num_layers):
            last = queries_only and i == self.num_layers - 1
            p = self.layer_params(meta, i, h.shape[-1], dim_out, num_context)
            h = attention_layer(p, h, num_context, softmax=self.softmax,
                                layer_norm=self.layer_norm, queries_only=last,
                                last_cols=last_cols if last else 0)
        return h

    def predict(self, meta: MetaParams, state: Support, query_x: Array) -> Array:
        """-(query tokens' y entries) after the layers, [Q, dy]."""
        n = state.x.shape[0]
        dy = state.y.shape[-1] if state.y.ndim > 1 else 1
        out = -self.forward(meta, self.tokens(meta, state, query_x), n, last_cols=dy, dim_out=dy)
        return out if state.y.ndim > 1 else out[:, 0]


# ---------------------------------------------------------------- the GD construction


def gd_construction(dim: int, dim_out: int, eta: float | Array, num_context: int,
                    gamma: float | Array = 0.0, num_layers: int = 1,
                    recurrent: bool = True) -> MetaParams:
    """LSA weights for which each layer is one GD step (eta) plus GD++'s input step (gamma).

    One head, key size D = dim + dim_out: W_Q = W_K = diag(I_d, 0), W_V = -I and
    P = diag(gamma/N I_d, eta/N I_dy), so a layer maps x_j <- x_j - (gamma/N) sum_i x_i x_i^T x_j
    and y_j <- y_j - (eta/N) sum_i y_i x_i^T x_j, i.e. y_j - dW x_j with
    dW = -eta grad L(W) the GD step on the residual targets held by the context tokens.
    """
    dd = dim + dim_out
    sel = jnp.diag(jnp.concatenate([jnp.ones(dim), jnp.zeros(dim_out)]))
    pdiag = jnp.concatenate([jnp.broadcast_to(jnp.asarray(gamma, jnp.float32), (dim,)),
                             jnp.broadcast_to(jnp.asarray(eta, jnp.float32), (dim_out,))])
    layer = {"query": sel[None], "key": sel[None], "value": -jnp.eye(dd)[None],
             "proj": (jnp.diag(pdiag) / num_context)[None]}
    if recurrent:
        return {"attn": layer}
    return {"attn": jax.tree.map(lambda a: jnp.stack([a] * num_layers), layer)}


def gd_construction_for(learner: LSA, example: Episode, eta: float | Array,
                        gamma: float | Array = 0.0) -> MetaParams:
    """`gd_construction` shaped for `learner` (its depth and weight tying) and this task."""
    if learner.embed_size or learner.softmax or learner.layer_norm or learner.num_heads != 1:
        raise ValueError("the GD construction is defined for 1-head linear attention on raw "
                         "inputs (no softmax, LayerNorm or embedding)")
    d, dy, _ = _dims(example, 0)
    return gd_construction(d, dy, eta, example.support_x.shape[0], gamma, learner.num_layers,
                           learner.recurrent)


def effective_step(meta: MetaParams, num_context: int, dim: int) -> dict[str, Array]:
    """The GD step sizes a trained 1-head linear layer implements, read off its weights.

    With A = W_Q W_K^T and B = W_V P, a layer is GD-like when A's x-block is c I and B is diagonal:
    then eta = -N c B_yy and gamma = -N c mean(diag B_xx) (per layer when not weight-tied).
    """
    a, b = attention_products(meta["attn"])
    c = jnp.mean(jnp.diagonal(a[..., 0, :dim, :dim], axis1=-2, axis2=-1), axis=-1)
    eta = -num_context * c * jnp.mean(jnp.diagonal(b[..., 0, dim:, dim:], axis1=-2, axis2=-1),
                                      axis=-1)
    gamma = -num_context * c * jnp.mean(jnp.diagonal(b[..., 0, :dim, :dim], axis1=-2, axis2=-1),
                                        axis=-1)
    return {"eta": eta, "gamma": gamma, "qk_scale": c}


def interpolate_with_construction(meta: MetaParams, construction: MetaParams, dim: int,
                                  alpha: float = 0.5) -> MetaParams:
    """Weights whose products are (1 - alpha) * trained + alpha * constructed (1 head, linear).

    The scale symmetry A -> A / c, B -> c B is removed first (c = mean of A's x-diagonal), as in
    the paper's interpolation analysis; the result uses W_Q = A, W_K = I, W_V = B, P = I.
    """
    a, b = attention_products(meta["attn"])
    ag, bg = attention_products(construction["attn"])
    c = jnp.mean(jnp.diagonal(a[..., :, :dim, :dim], axis1=-2, axis2=-1), axis=-1)
    a, b = a / c[..., None, None], b * c[..., None, None]
    eye = jnp.broadcast_to(jnp.eye(a.shape[-1]), a.shape)
    return {"attn": {"query": (1 - alpha) * a + alpha * ag, "key": eye,
                     "value": (1 - alpha) * b + alpha * bg, "proj": eye}}

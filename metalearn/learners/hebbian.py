"""Multi-state Hebbian networks with a meta-learned "genome" (BLUR: Sandler et al., ICML 2021,
"Meta-Learning Bidirectional Update Rules").

A fully connected network of L layers whose neurons hold k states (a^c_{bis}: example b, unit
i, state s) and whose synapses hold k channels, one per post-synaptic state: per layer pair a
forward block F^c_{ijl} ((n_c + 1) x n_{c+1} x k; the extra row is the bias unit, whose states
are all 1) and a separate backward block G^c_{jil} (n_{c+1} x n_c x k). The network learns
without gradients; one inner step on a batch (x, y) is

1. reset every neuron to 0, put x into state 0 of the input layer;
2. forward, c = 0..L-1:   a^{c+1}_{bjl} = phi( eta_n sum_{i,s} a~^c_{bis} nu_{sl} F^c_{ijl} );
3. feedback: the output layer's state 1 becomes the target code y ("label"), or y - a^L_0
   ("error");
4. backward, c = L-1..1:  Delta_{bil} = sum_{j,s} a^{c+1}_{bjs} mu_{sl} G^c_{jil}, then
   "additive":                     a^c <- phi_b( lambda_n a^c + eta_n Delta )
   "multiplicative":               a^c <- phi_b( lambda_n a^c * Delta )
   "multiplicative_second_state":  a^c <- phi_b( lambda_n [a^c_0, a^c_{1:} * Delta_{1:}] );
5. Hebbian update of every block, summed over the batch, one outer product per channel o:
   H^F_{ijo} = sum_b (a~^c P)_{bio} (a^{c+1} Q^T)_{bjo},  H^G_{jio} = sum_b (a^{c+1} P)_{bjo}
   (a^c Q^T)_{bio};  W <- lambda_w W + eta_w H.

The genome, shared by all layers and the meta-parameters here, is {nu, mu, P, Q} (k x k each)
and the scalars {lambda_n ("neuron_keep"), eta_n ("neuron_update"), lambda_w
("synapse_keep"), eta_w ("synapse_update")}: 4k^2 + 4 numbers (20 for k = 2), whatever the
network's size. Options of the paper's code: the backward update mode, symmetric synapses
(G = F^T) and symmetric states (every channel = channel 0), synapse normalisation
(F_{:,j,s} <- r F_{:,j,s} / ||F_{:,j,s}||, r learned), Oja decay (H += -sign(eta_w) |m| W (post
Q^T)^2, m learned), exp-saturation (dW = ((lambda_w - 1) W + eta_w H) exp(-|W| (eps + |g|)), g
learned), any number of hidden layers.

With k = 2 the genome `gradient_genome(lr)` (nu = [[1, 1], [0, 0]], mu = I, P = I,
Q = [[0, 1], [1, 0]], eta_w = lr) and `backprop_learner` (f and f' in states 0 and 1, error
feedback, multiplicative second state, symmetric synapses and states) make one inner step exactly
one SGD step of backprop on the MLP of weights F^c_{::0} and loss 1/2 sum_b ||y_hat - y||^2.

As an inner learner (`metalearn.learners.network.Network`, which it shares with the learned
optimizers and the SGD/Adam `GradientBaseline` it is compared with): `adapt` draws fresh
synapses per episode (U(-1, 1) scale / sqrt(N), `replicas` independent draws `vmap`ped), runs
`inner_steps` updates on support batches (`lax.scan`), `predict` is a forward pass (the
replicas' mean output). The meta-loss is the paper code's: the mean squared error of output
state 0 against the target codes (one-hot, off value `target_low`) on the queries; accuracy is
the argmax of output state 0.

Storage is state-first, so that every product is a matmul batched over the k states: neurons
[k, B, n_c], F [k, n_c + 1, n_{c+1}], G [k, n_{c+1}, n_c]. The input layer is never updated by
the backward pass, so G^0 is never read: it is neither updated nor kept in sync (the rule then
costs forward products and one outer product per state and layer; benchmarks/hebbian.py times
it against a `jax.grad` + SGD step).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metalearn.core import Array, Episode, MetaParams
from metalearn.learners.network import ACTIVATIONS, Network, check_activation

BACKWARD_UPDATES = ("additive", "multiplicative", "multiplicative_second_state")
FEEDBACKS = ("label", "error")
SATURATION_EPS = 1e-3
NORM_EPS = 1e-9


def _with_bias(a: Array) -> Array:
    """States [k, B, n] with the bias unit appended: [k, B, n + 1], all its states 1."""
    return jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], axis=2)



def random_genome(key: Array, states: int = 2, std: float = 1.0,
                  synapse_update: float = -1e-3, extras: tuple[str, ...] = ()) -> dict:
    """A random genome: nu, mu, P, Q ~ N(0, std^2); keep = update = 1 for neurons, keep = 1 and
    update = `synapse_update` for synapses (the paper code's init); `extras` adds the learned
    scalars of the options ("oja", "saturation", "rescale_to": 1 each)."""
    kn, km, kp, kq = jax.random.split(key, 4)
    shape = (states, states)
    g = {"nu": std * jax.random.normal(kn, shape), "mu": std * jax.random.normal(km, shape),
         "pre": std * jax.random.normal(kp, shape), "post": std * jax.random.normal(kq, shape),
         "neuron_keep": jnp.float32(1.0), "neuron_update": jnp.float32(1.0),
         "synapse_keep": jnp.float32(1.0), "synapse_update": jnp.float32(synapse_update)}
    return {**g, **{e: jnp.float32(1.0) for e in extras}}


def gradient_genome(learning_rate: float = 0.1) -> dict:
    """The k = 2 genome whose inner step is one SGD step of backprop (with `backprop_learner`):
    both forward states receive z = a~ W, the backward pass sends the error through state 1,
    and H^F = a~_0 (x) delta = -dL/dW."""
    eye = jnp.eye(2)
    return {"nu": jnp.array([[1.0, 1.0], [0.0, 0.0]]), "mu": eye, "pre": eye,
            "post": jnp.array([[0.0, 1.0], [1.0, 0.0]]), "neuron_keep": jnp.float32(1.0),
            "neuron_update": jnp.float32(1.0), "synapse_keep": jnp.float32(1.0),
            "synapse_update": jnp.float32(learning_rate)}


@dataclasses.dataclass(frozen=True)
class HebbianLearner(Network):
    """A multi-state network trained per episode by the genome's bidirectional Hebbian rule;
    the genome is the meta-parameters (see the module docstring for the equations)."""

    states: int = 2  # k
    backward_activation: str = "relu_tanh"
    backward_update: str = "additive"
    feedback: str = "label"
    symmetric_synapses: bool = False  # G = F^T (bias row left out), at init and every update
    symmetric_states: bool = False  # every channel = channel 0, at init and every update
    normalize_synapses: bool = False  # unit-norm incoming weights times learned rescale_to
    oja: bool = False  # Oja decay with a learned multiplier
    saturation: bool = False  # exp-saturated update with a learned g
    truncate: int = 0  # > 0: meta-gradients flow through the last `truncate` steps only
    genome_std: float = 1.0  # std of nu, mu, P, Q in `init` (the random genome)
    synapse_update_init: float = -1e-3  # eta_w of `init`

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.states < 2:
            raise ValueError(f"HebbianLearner.states must be >= 2 (state 1 carries the "
                             f"feedback), got {self.states}")
        check_activation("HebbianLearner", "backward_activation", self.backward_activation)
        if self.backward_update not in BACKWARD_UPDATES:
            raise ValueError(f"HebbianLearner.backward_update={self.backward_update!r}; choose "
                             f"one of {BACKWARD_UPDATES}")
        if self.feedback not in FEEDBACKS:
            raise ValueError(f"HebbianLearner.feedback={self.feedback!r}; choose one of "
                             f"{FEEDBACKS}")
        if self.truncate < 0:
            raise ValueError(f"HebbianLearner.truncate must be >= 0 (0: no truncation), got "
                             f"{self.truncate}")

    @property
    def extras(self) -> tuple[str, ...]:
        """The learned scalars of the options in force."""
        return tuple(e for e, on in (("oja", self.oja), ("saturation", self.saturation),
                                     ("rescale_to", self.normalize_synapses)) if on)

    def init(self, key: Array, example: Episode) -> MetaParams:
        """A random genome (`random_genome`) for this learner's states and options."""
        self.check_episode(example)
        return random_genome(key, self.states, self.genome_std, self.synapse_update_init,
                             self.extras)

    def named_meta(self, name: str) -> dict:
        """A genome by name (the outer loops' `init_from`): "gradient" or "gradient:LR", the
        backprop genome at rate LR (default 0.1) in the first two states, the options' scalars
        at 1. (It is exactly backprop only on `backprop_learner`'s network.)"""
        kind, _, rate = name.partition(":")
        if kind != "gradient":
            raise ValueError(f"HebbianLearner offers the genome 'gradient' or 'gradient:LR' "
                             f"(e.g. gradient:0.05), not {name!r}")
        try:
            lr = float(rate) if rate else 0.1
        except ValueError:
            raise ValueError(f"{name!r}: the rate after 'gradient:' must be a number, e.g. "
                             "gradient:0.05") from None
        g = gradient_genome(lr)
        k = self.states

        def embed(m: Array) -> Array:
            return jnp.zeros((k, k)).at[:2, :2].set(m)
        out = {n: embed(v) if jnp.ndim(v) == 2 else v for n, v in g.items()}
        return {**out, **{e: jnp.float32(1.0) for e in self.extras}}

    # ----- synapses
    def _sync(self, syn: list[dict]) -> list[dict]:
        out = []
        for c, s in enumerate(syn):
            f, g = s["F"], s["G"]
            if self.symmetric_states:
                f = jnp.broadcast_to(f[:1], f.shape)
                g = g if c == 0 else jnp.broadcast_to(g[:1], g.shape)
            if self.symmetric_synapses and c > 0:
                g = jnp.swapaxes(f[:, :-1], 1, 2)
            out.append({"F": f, "G": g})
        return out

    def init_state(self, meta: MetaParams, key: Array, d_in: int) -> list[dict]:
        """Fresh synapses with k channels (made symmetric where the options say)."""
        return self._sync(self.synapses(key, d_in, self.states))

    def _normalized(self, meta: MetaParams, syn: list[dict]) -> list[dict]:
        def unit(w: Array, axis: int) -> Array:
            return meta["rescale_to"] * w * jax.lax.rsqrt(
                jnp.sum(jnp.square(w), axis=axis, keepdims=True) + NORM_EPS)
        return [{"F": unit(s["F"], 1), "G": unit(s["G"], 1) if c else s["G"]}
                for c, s in enumerate(syn)]

    # ----- neurons
    def forward(self, meta: MetaParams, syn: list[dict], x: Array) -> list[Array]:
        """Neuron states [k, B, n_c] of every layer after the forward pass from reset neurons."""
        a = jnp.zeros((self.states, *x.shape), x.dtype).at[0].set(x)
        acts = [a]
        for c, s in enumerate(syn):
            delta = jnp.einsum("sbi,sl->lbi", _with_bias(a), meta["nu"]) @ s["F"]
            last = c == len(syn) - 1
            act = ACTIVATIONS[self.output_activation if last else self.hidden_activation]
            a = act(meta["neuron_update"] * delta)
            acts.append(a)
        return acts

    def backward(self, meta: MetaParams, syn: list[dict], acts: list[Array]) -> list[Array]:
        """Hidden neuron states after the backward pass from the output layer (input kept)."""
        acts = list(acts)
        phi = ACTIVATIONS[self.backward_activation]
        keep, upd = meta["neuron_keep"], meta["neuron_update"]
        for c in range(len(syn) - 1, 0, -1):
            delta = jnp.einsum("sbj,sl->lbj", acts[c + 1], meta["mu"]) @ syn[c]["G"]
            a = acts[c]
            if self.backward_update == "additive":
                a = keep * a + upd * delta
            elif self.backward_update == "multiplicative":
                a = keep * a * delta
            else:
                a = keep * jnp.concatenate([a[:1], a[1:] * delta[1:]])
            acts[c] = phi(a)
        return acts

    def feedback_in(self, out: Array, y: Array) -> Array:
        """The output layer with the target (label mode) or the error y - a_0 in state 1."""
        fb = y if self.feedback == "label" else y - out[0]
        return out.at[1].set(fb).at[2:].set(0.0)

    # ----- synapse update
    def _hebbian(self, meta: MetaParams, w: Array, pre: Array, post: Array) -> Array:
        """lambda_w W + eta_w H (or a saturated / Oja-decayed variant) for a block W [k, p, q]
        between `pre` [k, B, p] and `post` [k, B, q] states."""
        pq = jnp.einsum("tbq,ot->obq", post, meta["post"])  # (post Q^T)_{obq}
        pp = jnp.einsum("sbp,so->obp", pre, meta["pre"])  # (pre P)_{obp}
        h = jnp.swapaxes(pp, 1, 2) @ pq  # H_{opq}: a matmul over the batch per state
        eta = meta["synapse_update"]
        if self.oja:
            h = h - jnp.sign(eta) * jnp.abs(meta["oja"]) * w * jnp.sum(pq ** 2, axis=1)[:, None]
        if self.saturation:
            dw = (meta["synapse_keep"] - 1.0) * w + eta * h
            return w + dw * jnp.exp(-jnp.abs(w) * (SATURATION_EPS + jnp.abs(meta["saturation"])))
        return meta["synapse_keep"] * w + eta * h

    def update(self, meta: MetaParams, syn: list[dict], x: Array, y: Array,
               t: Array) -> list[dict]:
        """One inner step: forward, feedback, backward, Hebbian update of every block."""
        if self.truncate:
            cut = self.inner_steps - self.truncate
            syn = jax.tree.map(lambda w: jnp.where(t < cut, jax.lax.stop_gradient(w), w), syn)
        used = self._normalized(meta, syn) if self.normalize_synapses else syn
        acts = self.forward(meta, used, x)
        acts[-1] = self.feedback_in(acts[-1], y)
        acts = self.backward(meta, used, acts)
        new = []
        for c, s in enumerate(used):
            pre, post = acts[c], acts[c + 1]
            new.append({"F": self._hebbian(meta, s["F"], _with_bias(pre), post),
                        "G": s["G"] if self.symmetric_synapses or c == 0 else
                        self._hebbian(meta, s["G"], post, pre)})
        return self._sync(new)

    def outputs(self, meta: MetaParams, syn: list[dict], x: Array) -> Array:
        """Output state 0 [B, ways] of a forward pass."""
        used = self._normalized(meta, syn) if self.normalize_synapses else syn
        return self.forward(meta, used, x)[-1][0]


def backprop_options(activation: str = "tanh") -> dict:
    """The HebbianLearner settings on which `gradient_genome` is backprop + SGD: k = 2, f/f'
    neurons (`activation`: tanh or sigmoid), a linear output, error feedback, multiplicative
    second state, symmetric synapses and states."""
    if activation not in ("tanh", "sigmoid"):
        raise ValueError(f"backprop_options: activation must be 'tanh' or 'sigmoid', got "
                         f"{activation!r}")
    return {"states": 2, "hidden_activation": f"{activation}_with_grad",
            "output_activation": "identity", "backward_activation": "identity",
            "backward_update": "multiplicative_second_state", "feedback": "error",
            "symmetric_synapses": True, "symmetric_states": True}


def backprop_learner(hidden: tuple[int, ...] = (20,), ways: int = 2,
                     activation: str = "tanh", **kw) -> HebbianLearner:
    """The network of `backprop_options` (on which `gradient_genome` is backprop + SGD)."""
    return HebbianLearner(ways=ways, hidden=hidden, **backprop_options(activation), **kw)


# ---------------------------------------------------------------- the gradient baselines

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

As an inner learner: `adapt` draws fresh synapses per episode (U(-1, 1) scale / sqrt(N),
`replicas` independent draws `vmap`ped), runs `inner_steps` updates on support batches
(`lax.scan`), `predict` is a forward pass (the replicas' mean output). The meta-loss is the
paper code's: the mean squared error of output state 0 against the target codes (one-hot, off
value `target_low`) on the queries; accuracy is the argmax of output state 0.

`GradientBaseline` trains the same network (same layers, activations, distribution of the
initial weights, batches and loss) by SGD or Adam for comparison.

Storage is state-first, so that every product is a matmul batched over the k states: neurons
[k, B, n_c], F [k, n_c + 1, n_{c+1}], G [k, n_{c+1}, n_c]. The input layer is never updated by
the backward pass, so G^0 is never read: it is neither updated nor kept in sync (the rule then
costs forward products and one outer product per state and layer; benchmarks/hebbian.py times
it against a `jax.grad` + SGD step).

One module, past the usual size, so that the paper's method (network, genome, the
backprop-equivalent genome and the gradient baseline it is compared with) reads in one place.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.core import Array, Episode, InnerLearner, MetaParams, PyTree, Support

META_LOSSES = ("mse", "balanced_mse", "cross_entropy")
BACKWARD_UPDATES = ("additive", "multiplicative", "multiplicative_second_state")
FEEDBACKS = ("label", "error")
SATURATION_EPS = 1e-3
NORM_EPS = 1e-9


def _with_grad(f: Callable[[Array], Array], df: Callable[[Array], Array]):
    def act(a: Array) -> Array:
        out = f(a)
        return out.at[1].set(df(a[1])) if a.shape[0] > 1 else out
    return act


def _with_bias(a: Array) -> Array:
    """States [k, B, n] with the bias unit appended: [k, B, n + 1], all its states 1."""
    return jnp.concatenate([a, jnp.ones((*a.shape[:2], 1), a.dtype)], axis=2)


def _relu_tanh(a: Array) -> Array:
    return jax.nn.relu(jnp.tanh(a))


# Activations of neuron states (applied to the whole state array [k, ...]). The *_with_grad
# ones put f(z) in state 0 and f'(z) in state 1: the neurons of the backprop-equivalent genome.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda a: a,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "relu_tanh": _relu_tanh,
    "sigmoid": jax.nn.sigmoid,
    "tanh_with_grad": _with_grad(jnp.tanh, lambda z: 1.0 - jnp.tanh(z) ** 2),
    "sigmoid_with_grad": _with_grad(jax.nn.sigmoid,
                                    lambda z: jax.nn.sigmoid(z) * (1.0 - jax.nn.sigmoid(z))),
}


def _check_activation(owner: str, field: str, name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}.{field}={name!r}; choose one of {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class _Network(InnerLearner):
    """A fully connected network trained from scratch per episode for `inner_steps` steps on
    support batches; what the Hebbian rule and its gradient baselines share."""

    ways: int = 2
    hidden: tuple[int, ...] = (20,)
    inner_steps: int = 4
    inner_batch_size: int | None = None  # None: the whole support set every step
    replicas: int = 1  # synapse initialisations per episode (vmapped; metrics averaged)
    hidden_activation: str = "relu_tanh"
    output_activation: str = "tanh"
    init_scale: float = 1.0  # synapses ~ U(-1, 1) * init_scale / sqrt(n_in + 1 + n_out)
    target_low: float = -1.0  # the target code of a class is one-hot with this off value
    meta_loss: str = "mse"  # scoring of the queries: mse, balanced_mse or cross_entropy
    score_steps: tuple[int, ...] = ()  # `loss` scores after each of these steps (): inner_steps

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "score_steps", tuple(sorted({int(t) for t in self.score_steps})))
        if any(t < 1 for t in self.score_steps):
            raise ValueError(f"{name}.score_steps must list inner step counts >= 1, got "
                             f"{self.score_steps}")
        if self.ways < 2:
            raise ValueError(f"{name}.ways must be >= 2 (one output unit per class), got "
                             f"{self.ways}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"{name}.hidden must list positive layer widths, got {self.hidden}")
        if self.inner_steps < 0:
            raise ValueError(f"{name}.inner_steps must be >= 0, got {self.inner_steps}")
        if self.inner_batch_size is not None and self.inner_batch_size < 1:
            raise ValueError(f"{name}.inner_batch_size must be >= 1 or None (the whole support "
                             f"set), got {self.inner_batch_size}")
        if self.replicas < 1:
            raise ValueError(f"{name}.replicas must be >= 1, got {self.replicas}")
        for f in ("hidden_activation", "output_activation"):
            _check_activation(name, f, getattr(self, f))
        if not self.init_scale > 0:
            raise ValueError(f"{name}.init_scale must be > 0, got {self.init_scale}")
        if self.meta_loss not in META_LOSSES:
            raise ValueError(f"{name}.meta_loss={self.meta_loss!r}; choose one of {META_LOSSES}")

    # ----- what a subclass provides
    def init_state(self, meta: MetaParams, key: Array, d_in: int) -> PyTree:
        """The network's weights at the start of an episode."""
        raise NotImplementedError

    def update(self, meta: MetaParams, state: PyTree, x: Array, y: Array, t: Array) -> PyTree:
        """One inner step on the batch (x [B, d], target codes y [B, ways]) at step t."""
        raise NotImplementedError

    def outputs(self, meta: MetaParams, state: PyTree, x: Array) -> Array:
        """The network's outputs [B, ways] (a forward pass)."""
        raise NotImplementedError

    # ----- shared
    def sizes(self, d_in: int) -> list[int]:
        """Layer widths, input to output."""
        return [d_in, *self.hidden, self.ways]

    def synapses(self, key: Array, d_in: int, states: int = 1) -> list[dict]:
        """Fresh synapses per layer: {"F": [k, n_c + 1, n_{c+1}], "G": [k, n_{c+1}, n_c]}."""
        out = []
        sizes = self.sizes(d_in)
        for c, k in enumerate(jax.random.split(key, len(sizes) - 1)):
            n_in, n_out = sizes[c], sizes[c + 1]
            lim = self.init_scale / math.sqrt(n_in + 1 + n_out)
            kf, kg = jax.random.split(k)
            out.append({"F": jax.random.uniform(kf, (states, n_in + 1, n_out), minval=-lim,
                                                maxval=lim),
                        "G": jax.random.uniform(kg, (states, n_out, n_in), minval=-lim,
                                                maxval=lim)})
        return out

    def mlp_outputs(self, weights: list[Array], x: Array) -> Array:
        """The plain MLP of weights [n_c + 1, n_{c+1}] (bias last row): outputs [B, ways]."""
        a = x
        for c, w in enumerate(weights):
            z = a @ w[:-1] + w[-1]
            a = ACTIVATIONS[self.output_activation if c == len(weights) - 1
                            else self.hidden_activation](z)
        return a

    def train_loss(self, weights: list[Array], x: Array, y: Array) -> Array:
        """The inner training loss of the plain MLP: batch-mean 1/2 squared error to codes y."""
        return 0.5 * jnp.mean(jnp.sum(jnp.square(self.mlp_outputs(weights, x) - y), axis=-1))

    def codes(self, y: Array) -> Array:
        """Target codes [B, ways] of integer labels."""
        return jax.nn.one_hot(y, self.ways) * (1.0 - self.target_low) + self.target_low

    def check_episode(self, example: Episode) -> None:
        """Refuse regression targets and labels beyond `ways`."""
        name = type(self).__name__
        if not example.is_classification:
            raise ValueError(f"{name} learns classification tasks (integer labels); the episode "
                             f"has {jnp.asarray(example.query_y).dtype} targets")
        top = int(np.max(np.concatenate([example.support_y, example.query_y])))
        if top >= self.ways:
            raise ValueError(f"the episode has labels up to {top} but {name}.ways="
                             f"{self.ways}: set ways >= {top + 1}")

    def _batches(self, support: Support, key: Array):
        x = support.x.reshape(support.x.shape[0], -1).astype(jnp.float32)
        y = self.codes(support.y)
        n = x.shape[0]
        b = self.inner_batch_size
        if b is None or b >= n:
            return lambda t: (x, y)
        order = jax.random.permutation(key, n)  # then consecutive slices, wrapping around

        def batch(t: Array) -> tuple[Array, Array]:
            idx = order[(t * b + jnp.arange(b)) % n]
            return x[idx], y[idx]
        return batch

    def _start(self, meta: MetaParams, x_shape: tuple[int, ...], key: Array
               ) -> tuple[PyTree, Array]:
        """The replicas' fresh networks (leading axis R) and the key of the inner batches."""
        k_init, k_batch = jax.random.split(key)
        d_in = math.prod(x_shape[1:])
        states = jax.vmap(lambda k: self.init_state(meta, k, d_in))(
            jax.random.split(k_init, self.replicas))
        return states, k_batch

    def _steps(self, meta: MetaParams, state: PyTree, batch, q: Array | None, ts: Array):
        """Inner steps `ts` of one replica: its state after them and, given queries q, its
        outputs after each step."""
        def body(s: PyTree, t: Array) -> tuple[PyTree, Array | None]:
            s = self.update(meta, s, *batch(t), t)
            return s, (None if q is None else self.outputs(meta, s, q))
        return jax.lax.scan(body, state, ts)

    def _train(self, meta: MetaParams, support: Support, key: Array, steps: int,
               query_x: Array | None = None):
        """Per replica: the trained state (and, given queries, outputs after every step)."""
        states, k_batch = self._start(meta, support.x.shape, key)
        batch = self._batches(support, k_batch)
        q = None if query_x is None else query_x.reshape(query_x.shape[0], -1)

        def one(state0: PyTree):
            state, trace = self._steps(meta, state0, batch, q, jnp.arange(steps))
            if q is not None:
                trace = jnp.concatenate([self.outputs(meta, state0, q)[None], trace])
            return state, trace

        return jax.vmap(one)(states)

    def for_evaluation(self) -> _Network:
        """The same learner scored after `inner_steps` only (`score_steps` is a meta-training
        objective; evaluations report accuracy at T, as the baselines are scored)."""
        return dataclasses.replace(self, score_steps=()) if self.score_steps else self

    def adapt(self, meta: MetaParams, support: Support, key: Array) -> PyTree:
        """The weights of `replicas` networks after `inner_steps` steps (leading axis R)."""
        return self._train(meta, support, key, self.inner_steps)[0]

    def _replica_outputs(self, meta: MetaParams, state: PyTree, query_x: Array) -> Array:
        x = query_x.reshape(query_x.shape[0], -1).astype(jnp.float32)
        return jax.vmap(lambda s: self.outputs(meta, s, x))(state)

    def predict(self, meta: MetaParams, state: PyTree, query_x: Array) -> Array:
        """Output state 0 [Q, ways], averaged over the replicas."""
        return jnp.mean(self._replica_outputs(meta, state, query_x), axis=0)

    def score(self, outputs: Array, y: Array) -> dict:
        """The meta-loss and accuracy (argmax) of outputs [..., Q, ways], averaged over any
        leading axes. "mse": mean squared error against the target codes (the paper's code);
        "balanced_mse": half on the true class's unit, half on the mean of the others (a
        constant output then scores no better than chance: with N-way one-hot codes plain MSE
        rewards predicting the off value everywhere); "cross_entropy": of the outputs as logits."""
        hot = jax.nn.one_hot(y, self.ways)
        sq = jnp.square(outputs - self.codes(y))
        if self.meta_loss == "mse":
            err = jnp.mean(sq, axis=-1)
        elif self.meta_loss == "balanced_mse":
            err = 0.5 * jnp.sum(sq * hot, -1) + 0.5 * jnp.sum(sq * (1 - hot), -1) / (self.ways - 1)
        else:
            err = -jnp.sum(hot * jax.nn.log_softmax(outputs, axis=-1), axis=-1)
        acc = jnp.argmax(outputs, axis=-1) == y
        return {"loss": jnp.mean(err), "accuracy": jnp.mean(acc)}

    def loss(self, meta: MetaParams, episode: Episode, key: Array) -> tuple[Array, dict]:
        """The replicas' mean query meta-loss (`meta_loss`) and accuracy after `inner_steps`
        steps, or their means over the counts of `score_steps` (one run of the networks, scored
        as it passes each count), so that a rule meta-trained on it must also hold up beyond
        its unroll T."""
        if not self.score_steps:
            state = self.adapt(meta, episode.support(), key)
            m = self.score(self._replica_outputs(meta, state, episode.query_x), episode.query_y)
            return m["loss"], m
        states, k_batch = self._start(meta, episode.support_x.shape, key)
        batch = self._batches(episode.support(), k_batch)
        outputs, t0 = [], 0
        for t in self.score_steps:
            states = jax.vmap(lambda s, t0=t0, t=t: self._steps(
                meta, s, batch, None, jnp.arange(t0, t))[0])(states)
            outputs.append(self._replica_outputs(meta, states, episode.query_x))
            t0 = t
        m = self.score(jnp.stack(outputs), episode.query_y)
        return m["loss"], m

    # ----- truncated unrolls (metalearn.outer.truncated)
    @property
    def horizon(self) -> int:
        """Inner steps of a whole task: `inner_steps`."""
        return self.inner_steps

    def unroll_init(self, meta: MetaParams, episode: Episode, key: Array) -> PyTree:
        """The inner state at step 0: the replicas' fresh networks and the batch key (as
        `adapt` draws them from `key`)."""
        return self._start(meta, episode.support_x.shape, key)

    def unroll(self, meta: MetaParams, carry: PyTree, episode: Episode, t0: Array,
               steps: int) -> tuple[PyTree, Array, dict]:
        """Inner steps t0 .. t0 + steps - 1 from `carry`: the new carry, and the query
        meta-loss and accuracy averaged over the networks after each of these steps (the
        truncation's share of the whole-task objective, the mean over steps 1..T)."""
        states, k_batch = carry
        batch = self._batches(episode.support(), k_batch)
        q = episode.query_x.reshape(episode.query_x.shape[0], -1).astype(jnp.float32)
        states, trace = jax.vmap(
            lambda s: self._steps(meta, s, batch, q, t0 + jnp.arange(steps)))(states)
        m = jax.vmap(self.score, in_axes=(1, None))(trace, episode.query_y)  # trace [R, K, ..]
        m = {k: jnp.mean(v) for k, v in m.items()}
        return (states, k_batch), m["loss"], m

    def curve(self, meta: MetaParams, episode: Episode, key: Array, steps: int) -> dict:
        """Query loss and accuracy [steps + 1] after 0, 1, ..., steps inner steps (the same
        networks and batches as `adapt`, so entry `inner_steps` equals `loss`)."""
        _, trace = self._train(meta, episode.support(), key, steps, episode.query_x)
        return jax.vmap(self.score, in_axes=(1, None))(trace, episode.query_y)


# ---------------------------------------------------------------- the Hebbian rule


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
class HebbianLearner(_Network):
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
        _check_activation("HebbianLearner", "backward_activation", self.backward_activation)
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

OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class GradientBaseline(_Network):
    """The same network (layers, activations, initial weight distribution, batches) trained by
    `optimizer` (sgd or adam) at `learning_rate` on the batch-mean 1/2 squared error to the
    target codes; nothing is meta-learned (the rate is tuned on training tasks by the
    experiment). Meta-parameters {"learning_rate": scalar} replace the field's rate, so one
    compiled program scores every rate of a sweep."""

    optimizer: str = "sgd"
    learning_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"GradientBaseline.optimizer={self.optimizer!r}; choose one of "
                             f"{OPTIMIZERS}")
        if not self.learning_rate > 0:
            raise ValueError(f"GradientBaseline.learning_rate must be > 0, got "
                             f"{self.learning_rate}")
        for f in ("hidden_activation", "output_activation"):
            if getattr(self, f).endswith("_with_grad"):
                raise ValueError(f"GradientBaseline.{f}={getattr(self, f)!r} is a multi-state "
                                 f"activation; the plain network uses "
                                 f"{getattr(self, f).removesuffix('_with_grad')!r}")

    def tx(self, meta: MetaParams) -> optax.GradientTransformation:
        """The optax optimizer, at meta's "learning_rate" when it has one."""
        return getattr(optax, self.optimizer)(meta.get("learning_rate", self.learning_rate))

    def init(self, key: Array, example: Episode) -> MetaParams:
        """No meta-parameters."""
        self.check_episode(example)
        return {}

    def init_state(self, meta: MetaParams, key: Array, d_in: int) -> tuple:
        """Weights [n_c + 1, n_{c+1}] (bias last row) and the optimizer state."""
        w = [s["F"][0] for s in self.synapses(key, d_in)]
        return w, self.tx(meta).init(w)

    def outputs(self, meta: MetaParams, state: tuple, x: Array) -> Array:
        """The MLP's outputs [B, ways]."""
        return self.mlp_outputs(state[0], x)

    def update(self, meta: MetaParams, state: tuple, x: Array, y: Array, t: Array) -> tuple:
        """One optimizer step on the batch."""
        w, opt = state
        g = jax.grad(self.train_loss)(w, x, y)
        upd, opt = self.tx(meta).update(g, opt, w)
        return optax.apply_updates(w, upd), opt

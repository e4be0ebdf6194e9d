"""The fully connected network that the Hebbian genome, the learned optimizers and MAML's
network entry train from scratch per episode (`Network`), and the same network trained by SGD
or Adam, the baseline they are compared with (`GradientBaseline`).

A network of layers `hidden` with `ways` outputs is drawn fresh per episode (synapses
U(-1, 1) * init_scale / sqrt(n_in + 1 + n_out), `replicas` independent draws `vmap`ped), trained
for `inner_steps` steps on support batches (`lax.scan`), and its queries scored by `meta_loss`
against one-hot target codes with off value `target_low`. A subclass says what one step does
(`init_state`, `update`, `outputs`): the Hebbian rule (`metalearn.learners.hebbian`), a learned
optimizer (`metalearn.learners.lopt`), SGD from meta-learned weights
(`metalearn.learners.maml.MAMLNetwork`) or `GradientBaseline` below. Weights are stored as
[n_c + 1, n_{c+1}] (bias last row); the Hebbian rule's synapses carry k states besides.
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

def _with_grad(f: Callable[[Array], Array], df: Callable[[Array], Array]):
    def act(a: Array) -> Array:
        out = f(a)
        return out.at[1].set(df(a[1])) if a.shape[0] > 1 else out
    return act


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


def check_activation(owner: str, field: str, name: str) -> None:
    """Refuse an activation name that is not in `ACTIVATIONS`, naming the choices."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}.{field}={name!r}; choose one of {sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class Network(InnerLearner):
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
            check_activation(name, f, getattr(self, f))
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

    def for_evaluation(self) -> Network:
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


OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class GradientBaseline(Network):
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

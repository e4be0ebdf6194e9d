"""The outer-loop contract: three pure functions of an explicit state.

An outer loop supplies `init` (the state from the learner and an example episode), `step` (one
meta-step, a pure function of the state: jit-able, scan-able) and `meta_params` (the
meta-parameters to deploy). Step t uses the PRNG key fold_in(run_key, t), so the numbers do not
depend on how steps are grouped into compiled calls, nor on a stop and resume in between. The
host side of a run (periodic evaluation, metrics, checkpoints, progress, resume) is
`metalearn.outer.driver`; `OuterLoop.run` calls it.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn.core import Array, InnerLearner, MetaParams, PyTree, TaskSampler

if TYPE_CHECKING:
    from metalearn.outer.driver import TrainResult


def initial_meta(learner: InnerLearner, sampler: TaskSampler, key: Array,
                 meta: MetaParams | None = None) -> MetaParams:
    """`learner.init(key, example)`, or the given meta-parameters after checking that they have
    the learner's structure and shapes (e.g. a trained genome, or a hand-made one)."""
    example = sampler.example()
    if meta is None:
        return learner.init(key, example)
    want = learner.init(key, example)  # concrete: an init may check the example's values
    have = jax.tree.map(jnp.shape, meta)
    shapes = jax.tree.map(lambda w: w.shape, want)
    if jax.tree.structure(have) != jax.tree.structure(shapes) or have != shapes:
        raise ValueError(f"the given initial meta-parameters do not fit {type(learner).__name__}"
                         f": they are {have}, the learner's are {shapes}; start from "
                         "meta-parameters of a run of the same learner and settings")
    return jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype), meta, want)


class OuterState(NamedTuple):
    """The whole state of an outer loop: a pytree that is checkpointed as is."""

    step: Array  # int32 scalar: meta-steps done
    key: Array  # the run's base PRNG key (step t uses fold_in(key, t))
    params: PyTree  # gradient: meta-parameters; evolution: the initial ones (shape template)
    opt_state: PyTree  # optax state, or the evosax strategy state


def device_mesh(shard: bool | None = None) -> Mesh | None:
    """A 1-D mesh ('data') over all devices when there are several (and `shard` allows)."""
    devices = jax.devices()
    if shard is False or (shard is None and len(devices) < 2):
        return None
    return Mesh(np.asarray(devices), ("data",))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every array of `tree` copied to every device of the mesh, also across processes (each
    process gives its own copy: they are equal, as every process computed them alike)."""
    spec = NamedSharding(mesh, P())

    def put(a: Any) -> jax.Array:
        host = np.asarray(jax.device_get(a))
        return jax.make_array_from_callback(host.shape, spec, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_leading(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Constrain every array's leading axis to be split across the mesh's devices."""
    if mesh is None:
        return tree
    spec = NamedSharding(mesh, P("data"))
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), tree)


def option(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line description (shown by `metalearn config`)."""
    return dataclasses.field(default=default, metadata={"doc": doc})


class OuterLoop:
    """Base class: subclasses implement `init`, `step`, `meta_params`; `run` drives them."""

    steps_per_call: int = 10
    shard: bool | None = None

    # ----- the pure functions a subclass provides -----
    def init(self, learner: InnerLearner, sampler: TaskSampler, key: Array,
             meta: MetaParams | None = None) -> OuterState:
        """Initial outer state for this learner and sampler (from `meta` when given)."""
        raise NotImplementedError

    def step(self, learner: InnerLearner, sampler: TaskSampler, state: OuterState,
             mesh: Mesh | None = None) -> tuple[OuterState, dict]:
        """One meta-step: a pure function of the state."""
        raise NotImplementedError

    def meta_params(self, state: OuterState) -> MetaParams:
        """The meta-parameters to deploy (gradient: the params; evolution: the mean)."""
        raise NotImplementedError

    def remedy(self) -> str:
        """The change to try after a non-finite loss, as CLI flags (`with ...`)."""
        return "a smaller step size"

    # ----- compiled steps -----
    def _multi_step(self, learner, sampler, mesh, state: OuterState, n: int):
        def body(s, _):
            return self.step(learner, sampler, s, mesh)

        return jax.lax.scan(body, state, None, length=n)

    def compiled_steps(self, learner: InnerLearner, sampler: TaskSampler,
                       mesh: Mesh | None = None):
        """`fn(state, n) -> (state, stacked metrics)`: n meta-steps in one compiled call."""
        return jax.jit(partial(self._multi_step, learner, sampler, mesh), static_argnums=1,
                       donate_argnums=0)

    # ----- the host driver (metalearn.outer.driver) -----
    def run(self, learner: InnerLearner, train_sampler: TaskSampler, key: Array, *, steps: int,
            **kwargs: Any) -> TrainResult:
        """Meta-train for `steps` meta-steps: `metalearn.outer.driver.run` with this loop."""
        from metalearn.outer.driver import run

        return run(self, learner, train_sampler, key, steps=steps, **kwargs)

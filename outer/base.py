"""The outer-loop driver shared by gradient and evolution meta-training.

An outer loop supplies three pure functions (`init`, `step`, `meta_params`); `run` compiles
several steps into one `jit` call (`lax.scan`), and around those calls does what a run needs:
periodic evaluation on a held-out sampler, metrics to the run directory, checkpoints every N
steps, a progress bar with the live loss, a clear stop on a non-finite loss, and exact resume.
Step t uses the PRNG key fold_in(run_key, t), so the numbers do not depend on how steps are
grouped into compiled calls, nor on a stop and resume in between.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from metalearn.checkpoint import Checkpointer
from metalearn.core import Array, InnerLearner, MetaParams, PyTree, TaskSampler, check_episode
from metalearn.evaluation import evaluate
from metalearn.runs import Run


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped at that step."""

    def __init__(self, step: int, value: float, last_checkpoint: int | None, where: str = ""):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        ck = (f"the last good checkpoint (step {last_checkpoint}{where}) is kept; "
              if last_checkpoint is not None else "no checkpoint had been written; ")
        super().__init__(
            f"training loss became {value} at step {step}: stopped. {ck}lower the learning rate "
            "(--set outer.learning_rate=...), enable gradient clipping (--set outer.clip_norm=1.0)"
            " or reduce the evolution step size (--set outer.std_init=...)")


class OuterState(NamedTuple):
    """The whole state of an outer loop: a pytree that is checkpointed as is."""

    step: Array  # int32 scalar: meta-steps done
    key: Array  # the run's base PRNG key (step t uses fold_in(key, t))
    params: PyTree  # gradient: meta-parameters; evolution: the initial ones (shape template)
    opt_state: PyTree  # optax state, or the evosax strategy state


class TrainResult(NamedTuple):
    """What `OuterLoop.run` returns."""

    meta: MetaParams
    state: OuterState
    history: list[dict]
    final_eval: dict | None
    steps_per_second: float


def device_mesh(shard: bool | None = None) -> Mesh | None:
    """A 1-D mesh ('data') over all devices when there are several (and `shard` allows)."""
    devices = jax.devices()
    if shard is False or (shard is None and len(devices) < 2):
        return None
    return Mesh(np.asarray(devices), ("data",))


def shard_leading(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Constrain every array's leading axis to be split across the mesh's devices."""
    if mesh is None:
        return tree
    spec = NamedSharding(mesh, P("data"))
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), tree)


@dataclasses.dataclass
class RunOptions:
    """Host-side options of `OuterLoop.run` (none of them changes the numbers)."""

    eval_every: int = 0  # 0: evaluate only at the end
    eval_episodes: int = 1000
    eval_batch_size: int = 250
    checkpoint_every: int = 0  # 0: only at the end (when a run directory is given)
    log_every: int = 1
    progress: bool = True
    max_to_keep: int = 3


class OuterLoop:
    """Base class: subclasses implement `init`, `step`, `meta_params`; `run` drives them."""

    steps_per_call: int = 10
    shard: bool | None = None

    # ----- the pure functions a subclass provides -----
    def init(self, learner: InnerLearner, sampler: TaskSampler, key: Array) -> OuterState:
        """Initial outer state for this learner and sampler."""
        raise NotImplementedError

    def step(self, learner: InnerLearner, sampler: TaskSampler, state: OuterState,
             mesh: Mesh | None = None) -> tuple[OuterState, dict]:
        """One meta-step: a pure function of the state."""
        raise NotImplementedError

    def meta_params(self, state: OuterState) -> MetaParams:
        """The meta-parameters to deploy (gradient: the params; evolution: the mean)."""
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-able settings of this outer loop."""
        return {"outer": type(self).__name__,
                **{k: v for k, v in dataclasses.asdict(self).items()}}  # type: ignore[arg-type]

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

    # ----- the driver -----
    def run(self, learner: InnerLearner, train_sampler: TaskSampler, key: Array, *, steps: int,
            eval_sampler: TaskSampler | None = None, run_dir: str | Path | None = None,
            config: dict | None = None, resume: bool = False,
            options: RunOptions | None = None,
            eval_learner: InnerLearner | None = None) -> TrainResult:
        """Meta-train for `steps` meta-steps (in total, counting steps done before a resume).

        `eval_learner` (default: `learner`) scores the periodic evaluations; it must take the
        same meta-parameters (e.g. a wrapper whose `loss` adds comparison metrics).
        """
        opts = options or RunOptions()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_episode(train_sampler.example(), name="the train sampler's episode")
        mesh = device_mesh(self.shard)
        state = self.init(learner, train_sampler, key)
        run = Run(run_dir) if run_dir is not None else None
        ckpt = Checkpointer(run.checkpoint_dir, opts.max_to_keep) if run else None
        if resume:
            if ckpt is None:
                raise ValueError("resume=True needs the run_dir of the run to continue")
            done, state = ckpt.restore(state)
            state = jax.tree.map(jnp.asarray, state)
            run.truncate_metrics(done)
        elif run is not None and ckpt.latest_step() is not None:
            raise FileExistsError(
                f"{run.path} already holds checkpoints (up to step {ckpt.latest_step()}); "
                "continue it with --resume, or choose a new --run-dir")
        if mesh is not None:  # replicated on every device (a global array across hosts)
            state = jax.device_put(jax.device_get(state), NamedSharding(mesh, P()))
        history = run.metrics() if run else []
        fn = self.compiled_steps(learner, train_sampler, mesh)
        eval_key = jax.random.PRNGKey(1_000_003)
        last_ckpt = ckpt.latest_step() if ckpt else None

        def do_eval(step: int) -> dict:
            res = evaluate(eval_learner or learner, self.meta_params(state), eval_sampler, eval_key,
                           opts.eval_episodes, opts.eval_batch_size)
            rec = {"step": step, "split": "eval", **res}
            history.append(rec)
            if run:
                run.log([rec])
            return res

        def save(step: int) -> None:
            nonlocal last_ckpt
            if ckpt is not None:
                ckpt.save(step, state, config)
                last_ckpt = step

        step = int(state.step)
        if step >= steps:
            raise ValueError(f"the run is already at step {step} >= steps={steps}; "
                             "raise --set steps=... to train further")
        bar = _progress(steps, step, opts.progress)
        t0, step0, final_eval = time.perf_counter(), step, None
        try:
            while step < steps:
                n = min(self.steps_per_call, steps - step)
                for every in (opts.eval_every if eval_sampler is not None else 0,
                              opts.checkpoint_every if ckpt else 0):
                    if every > 0:
                        n = min(n, every - step % every)
                state, metrics = fn(state, n)
                metrics = jax.device_get(metrics)
                recs = [{"step": step + i + 1, "split": "train",
                         **{k: float(np.asarray(v)[i]) for k, v in metrics.items()}}
                        for i in range(n)]
                bad = next((r for r in recs if not np.isfinite(r["loss"])), None)
                logged = [r for r in recs if r["step"] % opts.log_every == 0 or r is recs[-1]]
                if bad is not None:
                    logged = [r for r in recs if r["step"] <= bad["step"]]
                history.extend(logged)
                if run:
                    run.log(logged)
                if bad is not None:
                    where = f" in {ckpt.directory}" if ckpt else ""
                    raise NonFiniteLossError(bad["step"], bad["loss"], last_ckpt, where)
                step += n
                bar.update(n)
                bar.set_postfix(loss=f"{recs[-1]['loss']:.4g}", refresh=False)
                if eval_sampler is not None and opts.eval_every and step % opts.eval_every == 0 \
                        and step < steps:
                    res = do_eval(step)
                    bar.write(f"step {step}: eval " + _fmt(res))
                if ckpt and opts.checkpoint_every and step % opts.checkpoint_every == 0:
                    save(step)
        finally:
            bar.close()
        dt = time.perf_counter() - t0
        sps = (step - step0) / dt if dt > 0 else float("nan")
        save(step)
        if eval_sampler is not None:
            final_eval = do_eval(step)
        if run:
            run.plot_curves()
        return TrainResult(self.meta_params(state), state, history, final_eval, sps)


def _fmt(res: dict) -> str:
    keys = [k for k in res if not k.endswith("_ci95") and k != "episodes"]
    return " ".join(f"{k}={res[k]:.4g}±{res.get(k + '_ci95', 0):.2g}" for k in keys)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="meta-train", unit="step", dynamic_ncols=True)

"""The host side of meta-training: the loop around an outer loop's compiled steps.

`run(outer, learner, sampler, key, steps=...)` compiles several of `outer`'s pure steps into
one `jit` call (`lax.scan`) and, between those calls, does what a run needs: periodic
evaluation on a held-out sampler, checkpoints every N steps, a progress bar with the live loss,
a clear stop on a non-finite loss, and exact resume. Every metric record (train steps and
evaluations) goes to the run's callbacks: with a run directory, `metrics.jsonl`
(`JsonlWriter`) and TensorBoard event files in `tensorboard/` (`TensorBoardWriter`; both in
`metalearn.outer.writers`); `callbacks=[...]` adds your own (any object with
`on_records(records)`, and optionally `close()`).

One module, past the usual size, because its parts share one run's state (`_Session`: the
step, the checkpointer, the writers, the progress bar) and read as one loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.checkpoint import REJECTED_DIR, Checkpointer
from metalearn.core import (
    Array,
    InnerLearner,
    MetaParams,
    TaskSampler,
    check_episode,
    check_predictions,
)
from metalearn.evaluation import evaluate, format_metrics
from metalearn.memory import release_free_memory
from metalearn.messages import arg, in_cli, setting
from metalearn.outer.base import OuterLoop, OuterState, device_mesh, replicate
from metalearn.outer.writers import TENSORBOARD_DIR, Callback, JsonlWriter, TensorBoardWriter
from metalearn.runs import Run
from metalearn.seeds import EVAL_SEED


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped at that step."""

    def __init__(self, step: int, value: float, last_checkpoint: int | None, where: str = "",
                 remedy: str = "a smaller step size", set_aside: str = ""):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        ck = (f"The last good checkpoint is step {last_checkpoint}{where} (its loss was finite): "
              f"resume from it ({arg('resume')}) with {remedy}."
              if last_checkpoint is not None else
              f"There is no good checkpoint to resume from: train again in a new run directory "
              f"({arg('run_dir')}) with {remedy}.")
        super().__init__(f"training loss became {value} at step {step}: stopped. {set_aside}"
                         f"{ck}")


class TrainResult(NamedTuple):
    """What `OuterLoop.run` returns."""

    meta: MetaParams
    state: OuterState
    history: list[dict]
    final_eval: dict | None
    steps_per_second: float


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
    tensorboard: bool = True  # with a run directory: TensorBoard event files too


def python_run_config(loop: OuterLoop, learner: InnerLearner, train_sampler: TaskSampler,
                      eval_sampler: TaskSampler | None, eval_learner: InnerLearner | None,
                      key: Array, steps: int, options: RunOptions,
                      user_config: dict | None) -> dict:
    """config.json of a run made with `OuterLoop.run(run_dir=...)`: the base fields, the outer
    loop, and the learner and samplers as specs that `load_run` can rebuild."""
    from metalearn.outer.registry import loop_config
    from metalearn.specs import object_spec

    # the base fields a Python run sets; `read_config` fills in the defaults of the others
    c = dict(experiment=None, experiment_source=None, seed=None, steps=steps,
             eval_every=options.eval_every, eval_episodes=options.eval_episodes,
             eval_batch_size=options.eval_batch_size, test_episodes=options.eval_episodes,
             checkpoint_every=options.checkpoint_every, log_every=options.log_every,
             outer=loop_config(loop).to_dict())
    c.update(made_by="OuterLoop.run", key=key_spec(key), learner=object_spec(learner),
             eval_learner=object_spec(eval_learner) if eval_learner is not None else None,
             samplers={"train": object_spec(train_sampler),
                       "eval": object_spec(eval_sampler) if eval_sampler is not None else None},
             user_config=user_config)
    return c


def key_spec(key: Array) -> dict:
    """A PRNG key (raw or typed) as JSON."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    return {"typed": bool(typed), "data": np.asarray(data).tolist()}


def key_from_spec(spec: dict) -> Array:
    """The PRNG key `key_spec` wrote."""
    data = jnp.asarray(spec["data"], jnp.uint32)
    return jax.random.wrap_key_data(data) if spec["typed"] else data


def run(outer: OuterLoop, learner: InnerLearner, train_sampler: TaskSampler, key: Array, *,
        steps: int,
        eval_sampler: TaskSampler | None = None, run_dir: str | Path | None = None,
        config: dict | None = None, resume: bool = False, from_step: int | None = None,
        options: RunOptions | None = None, eval_learner: InnerLearner | None = None,
        init_meta: MetaParams | None = None,
        callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Meta-train with `outer` for `steps` meta-steps (in total, counting steps done before a
    resume).

    `resume` continues the run in `run_dir` from its latest checkpoint, or from the one of
    `from_step` (later checkpoints are then set aside in rejected_checkpoints/).
    `eval_learner` (default: `learner.for_evaluation()`) scores the periodic evaluations; it
    must take the same meta-parameters (e.g. a wrapper whose `loss` adds comparison metrics).
    `init_meta` starts from these meta-parameters instead of `learner.init` (e.g. a trained
    or hand-made genome); a resume takes the checkpoint's. `callbacks` receive every metric
    record, after the run directory's writers.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_episode(train_sampler.example(), name="the train sampler's episode")
    options = options or RunOptions()
    # a run made from Python (not by an experiment) records what it can to be reloaded
    from_python = run_dir is not None and not (config or {}).get("experiment")
    if from_python:
        config = python_run_config(outer, learner, train_sampler, eval_sampler, eval_learner,
                                   key, steps, options, config)
    s = _Session(outer, learner, eval_learner or learner.for_evaluation(), eval_sampler, options,
                 Run(run_dir) if run_dir is not None else None, config, callbacks)
    try:
        result = _drive(s, learner, train_sampler, key, steps, resume, from_step,
                             from_python, init_meta)
    finally:
        s.close()
    if from_python:
        s.run.write_json("config.json", config)
        s.run.write_json("summary.json", {"experiment": None, "steps": steps,
                                          **training_summary(result),
                                          "eval": result.final_eval})
    return result


def _drive(s: _Session, learner: InnerLearner, train_sampler: TaskSampler, key: Array,
           steps: int, resume: bool, from_step: int | None,
           from_python: bool = False, init_meta: MetaParams | None = None) -> TrainResult:
    s.start(train_sampler, key, resume, steps, from_step, init_meta)
    if from_python and not resume:
        s.run.write_json("config.json", s.config)
    fn = s.outer.compiled_steps(learner, train_sampler, s.mesh)
    bar = _progress(steps, s.step, s.opts.progress)
    t0, step0, executables, warned = time.perf_counter(), s.step, {}, False
    try:
        while s.step < steps:
            n = s.chunk(steps)
            if n not in executables:  # compiled ahead, so that what LLVM freed is handed
                with _compile_notice(bar if s.opts.progress else None,
                                     f"compiling the meta-step ({n} steps a call)"):
                    executables[n] = fn.lower(s.state, n).compile()  # back before the
                release_free_memory()  # first call's buffers come on top of it
            t_call = time.perf_counter()
            s.state, metrics = executables[n](s.state)
            loss = s.record(jax.device_get(metrics), n)
            if s.opts.progress and not warned:
                warned = _warn_if_long(bar, (time.perf_counter() - t_call) / n, steps - s.step)
            bar.update(n)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if s.due(s.opts.eval_every if s.eval_sampler is not None else 0) \
                    and s.step < steps:
                bar.write(f"step {s.step}: evaluation on {s.opts.eval_episodes} "
                          f"episodes: {format_metrics(s.evaluate())}")
            if s.due(s.opts.checkpoint_every):
                s.save()
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    # a resume of a finished run trains no step: its speed is the summary's, if it has one
    sps = (s.step - step0) / dt if s.step > step0 and dt > 0 else s.earlier_speed()
    s.save()
    final_eval = s.evaluate(final=True) if s.eval_sampler is not None else None
    if s.run:
        s.run.plot_curves()
    return TrainResult(s.outer.meta_params(s.state), s.state, s.history, final_eval, sps)


def training_summary(result: TrainResult) -> dict:
    """The training figures of summary.json: speed and the final train loss (last 50 steps)."""
    out = {"steps_per_second": result.steps_per_second}
    train = [r["loss"] for r in result.history if r.get("split") == "train"]
    if train:
        out["final_train_loss"] = float(np.mean(train[-50:]))
    return out


class _Session:
    """The host side of one `OuterLoop.run` call: state, history, checkpoints, evaluations."""

    def __init__(self, outer: OuterLoop, learner: InnerLearner, eval_learner: InnerLearner,
                 eval_sampler: TaskSampler | None, opts: RunOptions, run: Run | None,
                 config: dict | None, callbacks: Sequence[Callback] = ()):
        if jax.process_index() != 0:  # in a multi-process run, process 0 shows progress
            opts = dataclasses.replace(opts, progress=False)
        self.outer, self.learner, self.eval_learner = outer, learner, eval_learner
        self.eval_sampler, self.opts, self.run, self.config = eval_sampler, opts, run, config
        self.ckpt = Checkpointer(run.checkpoint_dir, opts.max_to_keep) if run else None
        self.mesh = device_mesh(outer.shard)
        self.history: list[dict] = []
        self.last_ckpt: int | None = None
        self.state: OuterState | None = None
        self.step = 0
        self.evaluated = False
        self.user_callbacks = list(callbacks)
        self.callbacks: list[Callback] = []

    def open_writers(self, resumed_at: int | None) -> None:
        """The run directory's metric writers, then the user's callbacks."""
        writers: list[Callback] = []
        if self.run is not None and self.run.writes:
            writers.append(JsonlWriter(self.run))
            if self.opts.tensorboard:
                writers.append(TensorBoardWriter(
                    self.run.path / TENSORBOARD_DIR,
                    purge_step=None if resumed_at is None else resumed_at + 1))
        self.callbacks = writers + self.user_callbacks

    def close(self) -> None:
        """Close the checkpointer and every callback that can be closed."""
        if self.ckpt is not None:
            self.ckpt.close()
        for c in self.callbacks:
            if callable(getattr(c, "close", None)):
                c.close()

    def say(self, text: str) -> None:
        """A status line, when progress output is on."""
        if self.opts.progress:
            print(text, flush=True)

    def start(self, sampler: TaskSampler, key: Array, resume: bool, steps: int,
              from_step: int | None = None, init_meta: MetaParams | None = None) -> None:
        """Initial state, or a checkpoint's on resume; replicated over the mesh.

        Nothing in the run directory changes before the resume is known to be possible."""
        resumed_at = None
        state = self.outer.init(self.learner, sampler, key, init_meta)
        meta = self.outer.meta_params(state)
        check_predictions(self.learner, meta, sampler.example(), "the train sampler's episode")
        if self.eval_sampler is not None:
            check_predictions(self.eval_learner, meta, self.eval_sampler.example(),
                              "the evaluation sampler's episode")
        if resume:
            if self.ckpt is None:
                raise ValueError("resume=True needs the run_dir of the run to continue")
            done, state = self.ckpt.restore(state, from_step)
            if done > steps:
                raise ValueError(f"the run is already at step {done} >= steps={steps}; "
                                 f"raise {setting('steps')} to train further")
            later = [s for s in self.ckpt.steps() if s > done]
            if later:
                self.ckpt.set_aside(later, f"superseded: the run was resumed from step {done}")
                self.say(f"checkpoints {later} set aside in {self.run.path / REJECTED_DIR}")
            state = jax.tree.map(jnp.asarray, state)
            self.run.truncate_metrics(done)
            resumed_at = done
            self.say(f"resuming from step {done} of {steps} ({self.ckpt.directory})" if
                     done < steps else f"training finished at step {done}: running the final "
                     "evaluation only")
        elif self.run is not None and self.run.holds_a_run():
            held = (f"checkpoints up to step {self.ckpt.latest_step()}"
                    if self.ckpt.latest_step() is not None else
                    "the metrics of an earlier run that stopped before its first checkpoint")
            raise FileExistsError(
                f"{self.run.path} already holds {held}; continue it with {arg('resume')} (when it "
                f"has checkpoints), or choose a new run directory ({arg('run_dir')}) or delete "
                "that one")
        if self.mesh is not None:  # replicated on every device (a global array across hosts)
            state = replicate(state, self.mesh)
        self.state, self.step = state, int(state.step)
        self.history = self.run.metrics() if self.run else []
        self.last_ckpt = self.ckpt.latest_step() if self.ckpt else None
        if self.step >= steps and not resume:
            raise ValueError(f"the run is already at step {self.step} >= steps={steps}; "
                             f"raise {setting('steps')} to train further")
        self.open_writers(resumed_at)

    def chunk(self, steps: int) -> int:
        """Steps in the next compiled call: up to the next evaluation, checkpoint or the end."""
        n = min(self.outer.steps_per_call, steps - self.step)
        for every in (self.opts.eval_every if self.eval_sampler is not None else 0,
                      self.opts.checkpoint_every if self.ckpt else 0):
            if every > 0:
                n = min(n, every - self.step % every)
        return n

    def due(self, every: int) -> bool:
        """True when the current step is a multiple of `every` (> 0)."""
        return every > 0 and self.step % every == 0

    def earlier_speed(self) -> float:
        """steps_per_second of the run's summary.json (NaN when there is none)."""
        if self.run is not None and (self.run.path / "summary.json").exists():
            return float(self.run.read_json("summary.json").get("steps_per_second", "nan"))
        return float("nan")

    def record(self, metrics: dict, n: int) -> float:
        """Log the metrics of `n` steps; stop on a non-finite loss. Returns the last loss."""
        recs = [{"step": self.step + i + 1, "split": "train",
                 **{k: float(np.asarray(v)[i]) for k, v in metrics.items()}} for i in range(n)]
        bad = next((r for r in recs if not np.isfinite(r["loss"])), None)
        if bad is not None:
            logged = [r for r in recs if r["step"] <= bad["step"]]
        else:
            logged = [r for r in recs if r["step"] % self.opts.log_every == 0 or r is recs[-1]]
        self.log(logged)
        if bad is not None:
            where = note = ""
            if self.ckpt is not None:
                # the loss of step t is that of the parameters saved at step t - 1: those from
                # step t - 1 on diverged, so the last good checkpoint is the one before them
                diverged = [c for c in self.ckpt.steps() if c >= bad["step"] - 1]
                aside = self.ckpt.set_aside(diverged, f"the loss became {bad['loss']} at step "
                                            f"{bad['step']} with these parameters")
                self.last_ckpt = self.ckpt.latest_step()
                where = f" in {self.ckpt.directory}"
                if aside is not None:
                    note = (f"The checkpoints of steps {diverged} held the diverging parameters "
                            f"and were moved to {aside}. ")
            raise NonFiniteLossError(bad["step"], bad["loss"], self.last_ckpt, where,
                                     self.outer.remedy(), note)
        self.step += n
        return recs[-1]["loss"]

    def log(self, records: list[dict]) -> None:
        """Add records to the history and hand them to the callbacks (the metric writers)."""
        self.history.extend(records)
        if records:
            for c in self.callbacks:
                c.on_records(records)

    def evaluate(self, final: bool = False) -> dict:
        """Evaluate the current meta-parameters on the evaluation sampler; log the result."""
        res = evaluate(self.eval_learner, self.outer.meta_params(self.state), self.eval_sampler,
                       jax.random.PRNGKey(EVAL_SEED), self.opts.eval_episodes,
                       self.opts.eval_batch_size, check=False,
                       progress="final evaluation" if final and self.opts.progress else None)
        self.log([{"step": self.step, "split": "eval", **res}])
        if not self.evaluated:  # the evaluation step was compiled: return what LLVM freed
            self.evaluated = True
            release_free_memory()
        return res

    def save(self) -> None:
        """Checkpoint the state at the current step (when there is a run directory)."""
        if self.ckpt is not None:
            self.ckpt.save(self.step, self.state, self.config)
            self.last_ckpt = self.step


LONG_RUN_S = 3600.0  # a run whose remaining steps would take longer says so once


def _warn_if_long(bar: Any, seconds_per_step: float, remaining: int) -> bool:
    """Say once, after the first compiled call, when the remaining steps will take longer than
    LONG_RUN_S at the measured speed, with the settings that make a run short."""
    if seconds_per_step * remaining <= LONG_RUN_S:
        return False
    hours = seconds_per_step * remaining / 3600
    device = jax.devices()[0].platform
    fix = ("for a smoke run use --quick, or train fewer steps (--set steps=N)" if in_cli() else
           "train fewer steps (steps=N), or for a smoke run metalearn.train(..., quick=True)")
    bar.write(f"at {seconds_per_step:.3g} s a step on this machine ({device}), the remaining "
              f"{remaining} steps take about {hours:.1f} h; {fix}")
    return True


COMPILE_NOTICE_S = 3.0  # a compilation slower than this says so while it runs


@contextlib.contextmanager
def _compile_notice(bar: Any | None, what: str) -> Iterator[None]:
    """Say `what ...` once a compilation has taken COMPILE_NOTICE_S, and then how long it took:
    a large step compiles for a minute or more with the progress bar standing still."""
    if bar is None:
        yield
        return
    t0, said = time.perf_counter(), threading.Event()

    def say() -> None:
        said.set()
        bar.write(f"{what} ...")

    timer = threading.Timer(COMPILE_NOTICE_S, say)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if said.is_set():
            bar.write(f"{what}: done in {time.perf_counter() - t0:.0f} s")


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

"""Checkpoints of a training state with orbax: atomic saves, clear errors, never a lost good one.

A checkpoint holds the outer loop's whole state pytree (meta-parameters, optimizer or ES state,
step, PRNG key) and the run's config. Orbax writes each step to a temporary folder and renames it
when complete, so a crash mid-save leaves earlier checkpoints intact; a step that is not finished
or fails to read is reported with its path, and older good steps are offered as a fallback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np

from metalearn.core import PyTree

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run's state structure."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _to_host(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


class Checkpointer:
    """Saves and restores training states under `directory/<step>/`."""

    def __init__(self, directory: str | Path, max_to_keep: int | None = 3):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=False)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None when there is none."""
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: PyTree, config: dict | None = None) -> Path:
        """Write `state` (and the config) for `step`; returns the checkpoint folder."""
        ocp = _ocp()
        if step in self.steps():
            return self.directory / str(step)
        args = {"state": ocp.args.StandardSave(_to_host(state))}
        if config is not None:
            args["config"] = ocp.args.JsonSave(config)
        self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
        self._mngr.wait_until_finished()
        return self.directory / str(step)

    def restore(self, target: PyTree, step: int | None = None) -> tuple[int, PyTree]:
        """Restore into the structure of `target` (a freshly initialised state).

        Returns (step, state). Raises CheckpointError, naming the folder and the fix, when the
        checkpoint is missing, corrupt, or was written by a differently configured run.
        """
        ocp = _ocp()
        steps = self.steps()
        if not steps:
            raise CheckpointError(
                f"no checkpoint found in {self.directory}; train first (metalearn train ...) or "
                "point to a run directory that has checkpoints/")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}")
        abstract = jax.tree.map(lambda a: np.zeros(np.shape(a), np.asarray(a).dtype),
                                _to_host(target))
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
            state = out["state"]
        except Exception as e:  # orbax raises many types for truncated/corrupt files
            older = [s for s in steps if s < step]
            hint = (f" Older checkpoints are intact: steps {older}; restore one with "
                    f"step={older[-1]} or delete {self.directory / str(step)}."
                    if older else "")
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} could not be read "
                f"({type(e).__name__}: {str(e)[:300]}). It is corrupt or was written by a run "
                f"with a different learner/outer-loop configuration.{hint}") from e
        got = jax.tree.structure(state)
        want = jax.tree.structure(abstract)
        if got != want:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} holds a state of a "
                                  "different structure than this run's; was it written with "
                                  "another config?")
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), strict=True):
            if np.shape(a) != np.shape(b):
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} has an array of shape "
                    f"{np.shape(a)} where this run expects {np.shape(b)}; the config "
                    "(learner size, population, ...) differs from the one it was saved with")
        return step, state

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with a checkpoint."""
        step = self.latest_step() if step is None else step
        path = self.directory / str(step) / "config" / "metadata"
        if not path.exists():
            raise CheckpointError(f"no config saved in checkpoint {self.directory / str(step)}")
        return json.loads(path.read_text())

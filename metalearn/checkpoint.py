"""Checkpoints of a training state with orbax: atomic saves, clear errors, never a lost good one.

A checkpoint holds the outer loop's whole state pytree (meta-parameters, optimizer or ES state,
step, PRNG key) and the run's config. Orbax writes each step to a temporary folder and renames it
when complete, so a crash mid-save leaves earlier checkpoints intact; a step that is not finished
or fails to read is reported with its path, and older good steps are offered as a fallback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from metalearn.core import PyTree
from metalearn.messages import in_cli

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not match the run's state structure."""


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _to_host(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


REJECTED_DIR = "rejected_checkpoints"  # beside checkpoints/: set aside, never deleted


class Checkpointer:
    """Saves and restores training states under `directory/<step>/`.

    With `create=False` (read-only use) a missing directory is not created: it simply holds no
    checkpoint.
    """

    def __init__(self, directory: str | Path, max_to_keep: int | None = 3, create: bool = True):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self._mngr = None
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
        if self.directory.is_dir():
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                                   enable_async_checkpointing=False)
            self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def close(self) -> None:
        """Release orbax's resources (its background threads) now rather than at exit."""
        if self._mngr is not None:
            self._mngr.close()
            self._mngr = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_aside(self, steps: list[int], why: str) -> Path | None:
        """Move the checkpoints of `steps` to ../rejected_checkpoints/ (kept, never deleted),
        with a note saying why; returns that folder (None when nothing was moved)."""
        moved = [s for s in steps if (self.directory / str(s)).exists()]
        if not moved:
            return None
        dest = self.directory.parent / REJECTED_DIR
        for s in moved if jax.process_index() == 0 else []:  # process 0 moves, for everyone
            dest.mkdir(exist_ok=True)
            target = dest / str(s)
            n = 1
            while target.exists():  # an earlier rejection of the same step
                target, n = dest / f"{s}.{n}", n + 1
            shutil.move(str(self.directory / str(s)), str(target))
            (dest / f"{target.name}.why.txt").write_text(why + "\n")
        if jax.process_count() > 1:  # the others wait until the folders have moved
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"metalearn set_aside {moved}")
        if self._mngr is not None:
            self._mngr.reload()
        return dest

    def steps(self) -> list[int]:
        """Steps with a finished checkpoint, ascending."""
        if self._mngr is None:
            return []
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
        with _interrupt_after():  # a Ctrl-C mid-save would leave orbax's threads half done
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
                f"no checkpoint found in {self.directory}; train first, or point to a run "
                "directory that has checkpoints/")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}")
        abstract = jax.tree.map(lambda a: np.zeros(np.shape(a), np.asarray(a).dtype),
                                _to_host(target))
        self._check_shapes(step, abstract)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))
            state = out["state"]
        except Exception as e:  # orbax raises many types for truncated/corrupt files
            older = [s for s in steps if s < step]
            cont = (f"`metalearn train --run-dir {self.directory.parent} --resume --from-step "
                    f"{older[-1]}`" if in_cli() else
                    f"resume=True, from_step={older[-1]} (or restore(target, step={older[-1]}))"
                    ) if older else ""
            hint = (f" Older checkpoints are intact: steps {older}; continue from one with "
                    f"{cont}." if older else "")
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

    def _check_shapes(self, step: int, abstract: PyTree) -> None:
        """A readable checkpoint whose arrays differ from this run's in name or shape was
        written with another configuration, not corrupted: say so before restoring (where
        orbax's failure would read as corruption, and the advice to resume from an older
        checkpoint would set the healthy newest one aside)."""
        saved = _saved_shapes(self.directory / str(step) / "state")
        if saved is None:  # unreadable metadata: the restore below reports it
            return
        want = _shapes(abstract)
        # only the same arrays with other shapes is a verdict: a partial listing may be damage
        if set(saved) != set(want) or saved == want:
            return
        diff = sorted(k for k in want if saved[k] != want[k])
        key = diff[0]
        what = (f"an array {'/'.join(key)} of shape {saved[key]} where this run expects "
                f"{want[key]}")
        raise CheckpointError(
            f"checkpoint {self.directory / str(step)} is intact but holds {what}: it was saved "
            "with another learner or outer-loop configuration than this run's. An override "
            f"that changes the meta-parameters (their sizes, the optimizer) cannot resume "
            f"this run; resume without it, or start a new run ({len(diff)} arrays differ)")

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with a checkpoint."""
        step = self.latest_step() if step is None else step
        path = self.directory / str(step) / "config" / "metadata"
        if not path.exists():
            raise CheckpointError(f"no config saved in checkpoint {self.directory / str(step)}")
        return json.loads(path.read_text())


def _key_names(path: tuple) -> tuple[str, ...]:
    """A pytree key path as plain names: dict keys, attribute names and indices alike."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree: PyTree) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every array leaf of `tree` by its key path, with its shape."""
    return {_key_names(p): tuple(np.shape(v)) for p, v in
            jax.tree_util.tree_leaves_with_path(tree)}


def _saved_shapes(path: Path) -> dict[tuple[str, ...], tuple[int, ...]] | None:
    """The array shapes a saved state holds (from orbax's metadata), or None if unreadable."""
    ocp = _ocp()
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.CRITICAL)  # orbax warns of a file it does not need here
    try:
        meta = ocp.StandardCheckpointer().metadata(path.absolute())
        tree = getattr(meta, "item_metadata", meta)
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
        return {_key_names(p): tuple(v.shape) for p, v in leaves}
    except Exception:  # noqa: BLE001 - any failure: leave the verdict to the restore
        return None
    finally:
        absl.setLevel(level)


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block has finished,
    then raise it: a checkpoint is written whole or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: got.append(sig))
    except ValueError:  # not settable here (an embedding interpreter): save as it comes
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if got:
        raise KeyboardInterrupt

"""The words of error messages, for the interface in use: Python arguments or CLI flags.

An error raised while a Python caller drives the library names the argument to change
(`resume=True`, `steps=...`, `GradientOuterLoop(learning_rate=...)`); the same error raised
under the `metalearn` command names the flag (`--resume`, `--set steps=...`). The command runs
inside `cli_mode()`; everything else speaks Python.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_CLI = contextvars.ContextVar("metalearn_cli", default="")  # the running command, or ""

# settings that `metalearn evaluate` takes as flags of its own (`--ways 5`), not as `--set`
EVALUATE_FLAGS = ("ways", "shots", "queries", "unlabeled", "within_group", "episodes",
                  "on_error")

# Python argument -> (as written in Python, as written on the command line)
_ARGS = {
    "resume": ("resume=True", "--resume"),
    "run_dir": ("run_dir=...", "--run-dir DIR"),
    "from_step": ("from_step=N", "--from-step N"),
    "split": ("split=...", "--split NAME"),
    "sets": ("sets=[...]", "--set KEY=VALUE"),
    "quick": ("quick=True", "--quick"),
}


@contextlib.contextmanager
def cli_mode(command: str = "train") -> Iterator[None]:
    """Within this block, messages name the flags of `metalearn COMMAND`."""
    token = _CLI.set(command or "train")
    try:
        yield
    finally:
        _CLI.reset(token)


def in_cli() -> bool:
    """True while the `metalearn` command runs."""
    return bool(_CLI.get())


def command() -> str:
    """The `metalearn` subcommand running (train, evaluate, ...), or "" from Python."""
    return _CLI.get()


def arg(name: str) -> str:
    """A Python argument (`resume=True`), or under the command line its flag (`--resume`)."""
    python, cli = _ARGS[name]
    return cli if in_cli() else python


def option(python: str, value: object = "...") -> str:
    """A function argument `python=value`, or under the command line its flag `--python value`
    (e.g. `ways=3` / `--ways 3`)."""
    return f"--{python.replace('_', '-')} {value}" if in_cli() else f"{python}={value}"


def setting(python: str, key: str | None = None, value: str = "...") -> str:
    """A setting to change: `python=value` (a constructor or function argument), or under the
    command line `--set KEY=value`, with KEY the config field (default: `python`); under
    `metalearn evaluate`, its own flag (`--ways 5`) where it has one, else the training
    setting, said to be one."""
    if not in_cli():
        return f"{python}={value}"
    value = value.strip('"')  # a Python string's quotes
    if command() == "evaluate":
        if python in EVALUATE_FLAGS:
            flag = f"--{python.replace('_', '-')}"
            return flag if python == "within_group" else f"{flag} {value}"
        return f"--set {key or python}={value} when training"
    return f"--set {key or python}={value}"


def override(key: str, value: str | None = None) -> str:
    """A config override `key[=value]` as given: `--set KEY`, or in Python `sets entry 'KEY'`
    (the `sets` argument of `metalearn.train`)."""
    text = key if value is None else f"{key}={value}"
    return f"--set {text}" if in_cli() else f"sets entry {text!r}"

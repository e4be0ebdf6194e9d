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

_CLI = contextvars.ContextVar("metalearn_cli", default=False)

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
def cli_mode() -> Iterator[None]:
    """Within this block, messages name command-line flags (the `metalearn` command)."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def in_cli() -> bool:
    """True while the `metalearn` command runs."""
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
    command line `--set KEY=value`, with KEY the config field (default: `python`)."""
    return f"--set {key or python}={value}" if in_cli() else f"{python}={value}"


def override(key: str, value: str | None = None) -> str:
    """A config override `key[=value]` as given: `--set KEY`, or in Python `sets entry 'KEY'`
    (the `sets` argument of `metalearn.train`)."""
    text = key if value is None else f"{key}={value}"
    return f"--set {text}" if in_cli() else f"sets entry {text!r}"

"""Finding experiments: built in, registered by an installed package, or a module of yours.

An experiment is a module: a built-in `metalearn.experiments.NAME`, a module of your own given
by its dotted path (`mypkg.my_exp`) or its file (`path/to/my_exp.py`), or a name that an
installed package registers under the `metalearn.experiments` entry point group. It defines
`get_config()` and `build(config, run)` (see `metalearn.experiment`). A run records where its
experiment came from (`experiment_source`), so that resume and evaluate import it again.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

from metalearn.config import ConfigDict

ENTRY_POINT_GROUP = "metalearn.experiments"
BUILTIN_PACKAGE = "metalearn.experiments"


def _builtin_names() -> list[str]:
    import metalearn.experiments as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_"))


def _entry_points() -> dict[str, str]:
    """Experiments that installed packages register: name -> module (entry point group
    `metalearn.experiments`)."""
    from importlib.metadata import entry_points

    return {ep.name: ep.module for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _first_doc_line(mod: ModuleType) -> str:
    doc = (mod.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def list_experiments() -> list[tuple[str, str]]:
    """(name, one-line description) of the built-in experiments and those that installed
    packages register under the `metalearn.experiments` entry point group."""
    out = {}
    for name in _builtin_names():
        mod = importlib.import_module(f"{BUILTIN_PACKAGE}.{name}")
        if _is_experiment(mod):
            out[name] = _first_doc_line(mod)
    for name, module in _entry_points().items():
        if name in out:
            continue  # a built-in name wins; the package's module is still reachable by path
        try:
            out[name] = f"{_first_doc_line(importlib.import_module(module))} [{module}]"
        except Exception as e:  # a broken plug-in must not hide the others
            out[name] = f"(cannot import {module}: {type(e).__name__}: {e})"
    return sorted(out.items())


def _is_experiment(mod: ModuleType) -> bool:
    return callable(getattr(mod, "get_config", None)) and callable(getattr(mod, "build", None))


def resolve_experiment(ref: str) -> tuple[str, str]:
    """(name, source) of an experiment given as a built-in or registered name, an importable
    module (`mypkg.my_exp`) or a Python file (`path/to/my_exp.py`).

    The source is what a run records to find its experiment again: the module's dotted path,
    or the file's absolute path.
    """
    if not ref:
        raise ValueError("no experiment given; name one (see `metalearn list`), or give a "
                         "module (mypkg.my_exp) or a file (path/to/my_exp.py)")
    if ref.endswith(".py") or "/" in ref or "\\" in ref:
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"experiment file {ref} does not exist (resolved to {path})")
        return path.stem, str(path)
    if ref in _builtin_names():
        return ref, f"{BUILTIN_PACKAGE}.{ref}"
    registered = _entry_points()
    if ref in registered:
        return ref, registered[ref]
    if "." in ref:
        try:
            found = importlib.util.find_spec(ref) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            return ref.rsplit(".", 1)[1], ref
    names = [n for n, _ in list_experiments()]
    close = difflib.get_close_matches(ref, names, n=1)
    raise ValueError(f"unknown experiment {ref!r}"
                     f"{f' (did you mean {close[0]}?)' if close else ''}; available: "
                     f"{', '.join(names)} (see "
                     "`metalearn list`), or give an importable module (mypkg.my_exp) or a "
                     "Python file (path/to/my_exp.py) that defines get_config() and build()")


def import_experiment(source: str) -> ModuleType:
    """The experiment module at `source` (a dotted module path or a .py file's path).

    A file is imported under its file name, with its folder on `sys.path` (as Python does
    for a script), so that it can import its neighbours and the classes it defines can be
    found again by module and name."""
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"experiment file {path} does not exist (moved or deleted "
                                    "since the run was made?)")
        folder = str(path.parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        name = path.stem
        have = sys.modules.get(name)
        if have is not None and Path(getattr(have, "__file__", "") or "").resolve() != path:
            name = f"metalearn_experiment_{path.stem}"  # the file name is taken by another
            have = sys.modules.get(name)
        if have is None:
            spec = importlib.util.spec_from_file_location(name, path)
            have = importlib.util.module_from_spec(spec)
            sys.modules[name] = have
            try:
                spec.loader.exec_module(have)
            except BaseException:
                del sys.modules[name]
                raise
        mod = have
    else:
        mod = importlib.import_module(source)
    if not _is_experiment(mod):
        raise ValueError(f"{source} is not an experiment module: it must define get_config() "
                         "(returning a ConfigDict, e.g. metalearn.experiment.base_config(...)) "
                         "and build(config, run) (returning a metalearn.experiment.Experiment)")
    return mod


def load_module(ref: str) -> ModuleType:
    """The experiment module that `ref` names (see `resolve_experiment`)."""
    return import_experiment(resolve_experiment(ref)[1])


def experiment_module(config: ConfigDict) -> ModuleType:
    """The module of a run's experiment, imported from its `experiment_source`."""
    return import_experiment(config.experiment_source)

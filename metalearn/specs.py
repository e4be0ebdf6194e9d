"""Objects as JSON and back: the settings of frozen-dataclass learners, models and samplers.

A run made from Python records its learner and samplers this way in config.json, so that
`metalearn.load_run` and `metalearn evaluate` can rebuild them. A dataclass becomes {"type":
"module.QualName", "fields": {...}}, its fields recursively; an object with a `spec()` method (a
`FewShotSampler`, an `ImageDataset` read from files) gives its own such recipe; what cannot be
written as JSON (arrays, functions, objects of other classes) is recorded by its class and
`repr` alone, and rebuilding it raises `NotRebuildable` naming it."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

CLASS, FIELDS, OPAQUE = "type", "fields", "repr"


def _is_object(spec: Any) -> bool:
    return isinstance(spec, dict) and set(spec) in ({CLASS, FIELDS}, {CLASS, OPAQUE})


class NotRebuildable(ValueError):
    """A recorded object that cannot be constructed again from its spec."""


def class_path(obj: Any) -> str:
    """`module.QualName` of an object's class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def object_spec(obj: Any) -> Any:
    """A JSON-able description of `obj` from which `rebuild` makes an equal object."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list | tuple):
        return [object_spec(v) for v in obj]
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {k: object_spec(v) for k, v in obj.items()}
    own = getattr(obj, "spec", None)  # objects that know how to be rebuilt say so
    if callable(own) and not isinstance(obj, type):
        made = own()
        return made if made is not None else {CLASS: class_path(obj), OPAQUE: repr(obj)[:200]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {CLASS: class_path(obj),
                FIELDS: {f.name: object_spec(getattr(obj, f.name))
                         for f in dataclasses.fields(obj) if f.init}}
    return {CLASS: class_path(obj), OPAQUE: repr(obj)[:200]}


def opaque_parts(spec: Any) -> list[str]:
    """Class names of the parts of a spec that cannot be rebuilt (empty: it can be)."""
    if isinstance(spec, list | tuple):
        return [p for v in spec for p in opaque_parts(v)]
    if not isinstance(spec, dict):
        return []
    if _is_object(spec):
        if OPAQUE in spec:
            return [spec[CLASS]]
        if spec[CLASS].startswith("__main__."):
            return [f"{spec[CLASS]} (defined in a script, not in an importable module)"]
        return [p for v in spec.get(FIELDS, {}).values() for p in opaque_parts(v)]
    return [p for v in spec.values() for p in opaque_parts(v)]


def rebuild(spec: Any) -> Any:
    """The object that `object_spec` described (lists come back as tuples)."""
    bad = opaque_parts(spec)
    if bad:
        raise NotRebuildable(f"it holds {', '.join(bad)}, which cannot be rebuilt from "
                             "config.json")
    if isinstance(spec, list | tuple):
        return tuple(rebuild(v) for v in spec)
    if not isinstance(spec, dict):
        return spec
    if not _is_object(spec):
        return {k: rebuild(v) for k, v in spec.items()}
    return _import_class(spec[CLASS])(**{k: rebuild(v) for k, v in spec[FIELDS].items()})


def _import_class(path: str) -> Any:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            break
        return obj
    raise NotRebuildable(f"its class {path} cannot be imported (is its module on the Python "
                         "path? e.g. PYTHONPATH=the/module's/folder)")

"""The outer loops by name, and the `outer` section of a config that builds one.

A loop is a dataclass subclass of `OuterLoop` registered under a name (`outer.kind`):

    @register("pes")
    @dataclasses.dataclass
    class PESOuterLoop(OuterLoop): ...

Its dataclass fields (those made with `option(default, doc)` are documented by `metalearn
config`) become the config section `outer.<kind>.*`; `batch_size`, `steps_per_call` and `shard`
are shared by every loop and sit in `outer` itself. The built-in loops register when their
modules are imported (`BUILTIN`); a loop of your own registers when you import its module, so a
new loop touches nothing outside its own file.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from metalearn.messages import override
from metalearn.specs import class_path

ConfigDict = ml_collections.ConfigDict

BUILTIN = ("metalearn.outer.gradient", "metalearn.outer.evolution", "metalearn.outer.truncated")
# Fields every loop takes, with one meaning: they sit in `outer` itself.
SHARED_OUTER_FIELDS = ("batch_size", "steps_per_call")
CUSTOM = "custom: "  # config.json's value for a user object (an optax or evosax instance)

_LOOPS: dict[str, type] = {}


def register(kind: str) -> Callable[[type], type]:
    """Class decorator: make an `OuterLoop` dataclass buildable as `outer.kind=<kind>`."""
    def add(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"outer loop {cls.__name__} must be a dataclass (its fields are its "
                            "config section); decorate it with @dataclasses.dataclass first")
        if cls.__module__ not in BUILTIN:
            outer_loops()  # the built-in names are taken first
        have = _LOOPS.get(kind)
        if have is not None and _qualified(have) != _qualified(cls):  # a re-import is fine
            raise ValueError(f"outer.kind={kind!r} is already registered, as "
                             f"{_qualified(have)}; register {_qualified(cls)} under another "
                             "name")
        _LOOPS[kind] = cls
        return cls
    return add


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def outer_loops() -> dict[str, type]:
    """Every registered loop by kind, the built-in ones first."""
    for module in BUILTIN:
        importlib.import_module(module)
    return dict(_LOOPS)


def outer_kinds() -> tuple[str, ...]:
    """The names `outer.kind` may take."""
    return tuple(outer_loops())


def _unknown_kind(kind: Any) -> ValueError:
    return ValueError(f"outer.kind={kind!r}; choose one of {', '.join(outer_kinds())}")


def section_fields(cls: type) -> dict[str, Any]:
    """The config section of loop class `cls`: its fields and defaults, shared ones left out."""
    skip = {*SHARED_OUTER_FIELDS, "total_steps", "shard", "strategy_params"}  # Python-only
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def outer_config(kind: str = "gradient", **given: Any) -> ConfigDict:
    """Config of the outer loop: `kind` picks which section (`outer.<kind>.*`) builds it.

    `batch_size` (episodes per meta-step / per generation), `steps_per_call` and `shard` are
    shared; every other field lives in the section of the one loop that reads it, given as a
    dict: `outer_config("evolution", evolution={"population_size": 16}, batch_size=4)`.
    """
    loops = outer_loops()
    if kind not in loops:
        raise _unknown_kind(kind)
    first = next(iter(loops.values()))
    c = ConfigDict({"kind": kind, **{k: getattr(first, k) for k in SHARED_OUTER_FIELDS},
                    "shard": "auto"})
    for name, cls in loops.items():
        section = section_fields(cls)
        for k, v in (given.pop(name, None) or {}).items():
            if k not in section:
                raise KeyError(f"outer.{name} has no field {k!r}; fields: {sorted(section)}")
            section[k] = v
        c[name] = ConfigDict(section)
    for k, v in given.items():
        if k not in c:
            raise KeyError(f"outer has no shared field {k!r}; shared fields: "
                           f"{[*SHARED_OUTER_FIELDS, 'shard']}; the others go in the loop's "
                           "section, e.g. gradient={...} or evolution={...}")
        c[k] = v
    return c


def upgrade_outer(outer: dict) -> dict:
    """An `outer` config of the runs made before the per-loop sections, in today's form."""
    loops = outer_loops()
    if any(k in outer for k in loops) or str(outer.get("kind")).startswith(CUSTOM):
        return outer
    shared = {k: outer[k] for k in (*SHARED_OUTER_FIELDS, "shard") if k in outer}
    sections = {k: {f: outer[f] for f in section_fields(cls) if f in outer}
                for k, cls in loops.items() if k in ("gradient", "evolution")}
    from metalearn.outer.evolution import ADAM_STRATEGIES

    evo = sections["evolution"]
    if evo.get("strategy") not in ADAM_STRATEGIES:
        evo["learning_rate"] = None  # the field was ignored by these strategies
    kind = outer.get("kind", "gradient")
    return outer_config(kind, **sections, **shared).to_dict()


def used_outer(c: ConfigDict) -> ConfigDict:
    """`c` (an outer config) without the sections of the loops it does not use."""
    kinds = outer_kinds()
    return ConfigDict({k: v for k, v in c.items() if k not in kinds or k == c.kind})


def check_outer_sets(c: ConfigDict, sets: Sequence[str]) -> None:
    """Refuse `--set outer.SECTION.FIELD` for a section that `outer.kind` does not use."""
    kinds = outer_kinds()
    for s in sets:
        parts = s.split("=", 1)[0].strip().split(".")
        if len(parts) >= 3 and parts[0] == "outer" and parts[1] in kinds \
                and parts[1] != c.kind:
            other = f"outer.{c.kind}.{parts[2]}"
            alt = (f"set {other} instead, or " if parts[2] in c[c.kind] else "")
            raise ValueError(f"{override('.'.join(parts))}: this run's loop is outer.kind="
                             f"{c.kind}, which reads outer.{c.kind}.*, not outer.{parts[1]}.*; "
                             f"{alt}add {override('outer.kind', parts[1])} to train with that "
                             "loop")


class CustomObjectError(ValueError):
    """An outer config that records an object given in Python (not a name)."""


def build_outer(c: ConfigDict, total_steps: int = 0):
    """An OuterLoop from its config: `c.kind`'s section plus the shared fields."""
    if str(c.kind).startswith(CUSTOM):
        raise CustomObjectError(f"its outer loop was a {c.kind[len(CUSTOM):]} object")
    loops = outer_loops()
    if c.kind not in loops:
        raise _unknown_kind(c.kind)
    for k, v in c.get(c.kind, {}).items():
        if isinstance(v, str) and v.startswith(CUSTOM):
            raise CustomObjectError(f"outer.{c.kind}.{k} was a {v[len(CUSTOM):]} object")
    if c.kind not in c:
        raise KeyError(f"outer.kind={c.kind!r} but the config has no outer.{c.kind} section")
    cls = loops[c.kind]
    kw = {**c[c.kind].to_dict(), **{k: c[k] for k in SHARED_OUTER_FIELDS}}
    kw["shard"] = {"auto": None, True: True, False: False}.get(c.get("shard", "auto"), None)
    if "total_steps" in {f.name for f in dataclasses.fields(cls)}:
        kw["total_steps"] = total_steps
    return cls(**kw)


def loop_config(loop: Any) -> ConfigDict:
    """The `outer` config that builds a loop like `loop` (what a run made from Python records);
    objects given in place of names are recorded as 'custom: <class>'."""
    kind = next((k for k, cls in outer_loops().items() if type(loop) is cls), None)
    if kind is None:
        return ConfigDict({"kind": CUSTOM + class_path(loop)})
    section = {k: getattr(loop, k) for k in section_fields(type(loop))}
    section = {k: v if v is None or isinstance(v, bool | int | float | str) else
               CUSTOM + class_path(v) for k, v in section.items()}
    shared = {k: getattr(loop, k) for k in SHARED_OUTER_FIELDS}
    shared["shard"] = {None: "auto"}.get(loop.shard, loop.shard)
    return used_outer(outer_config(kind, **{kind: section}, **shared))


def outer_docs() -> dict[str, str]:
    """`outer.<kind>.<field>` -> one-line description, for every registered loop."""
    return {f"outer.{kind}.{f.name}": f.metadata["doc"]
            for kind, cls in outer_loops().items() for f in dataclasses.fields(cls)
            if "doc" in f.metadata}

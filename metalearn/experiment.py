"""Experiments: config modules (built in, yours, or registered by a package), plus training,
reloading and evaluation of runs.

An experiment is a module: a built-in `metalearn.experiments.NAME`, a module of your own given
by its dotted path (`mypkg.my_exp`) or its file (`path/to/my_exp.py`), or a name that an
installed package registers under the `metalearn.experiments` entry point group. It has a
one-line docstring and two functions:

    get_config() -> ml_collections.ConfigDict     # every field overridable with --set key=value
    build(config, run: Run | None) -> Experiment  # learner and samplers per split

and optionally a `DOCS` dict (dotted field name -> one-line description, shown by
`metalearn config NAME`). `build` must be cheap: it runs again for every `metalearn evaluate`,
so work such as fitting a baseline is done once and kept in the run directory
(`cached_json`). The outer loop is built from `config.outer` (`outer_config`). The experiment
may set `Experiment.report`, called after training with the run's config, for extra headline
figures in summary.json.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import importlib
import importlib.util
import pkgutil
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import jax
import ml_collections

from metalearn.core import InnerLearner, MetaParams, TaskSampler
from metalearn.evaluation import evaluate
from metalearn.messages import arg, in_cli, override
from metalearn.runs import Run
from metalearn.seeds import TEST_SEED

if TYPE_CHECKING:
    from metalearn.reload import LoadedRun

ConfigDict = ml_collections.ConfigDict


@dataclasses.dataclass
class Experiment:
    """What an experiment's `build` returns."""

    learner: InnerLearner
    splits: dict[str, TaskSampler]  # at least "train"; "validation"/"test" for held-out tasks
    # scores evaluations when given (same meta-parameters as `learner`, e.g. extra metrics)
    eval_learner: InnerLearner | None = None
    # extra headline figures: report(exp, meta, run, config, progress=...) -> dict for summary.json
    report: Callable[..., dict] | None = None

    @property
    def evaluator(self) -> InnerLearner:
        """The learner that scores evaluations."""
        return self.eval_learner or self.learner

    @property
    def train(self) -> TaskSampler:
        """The meta-training sampler."""
        return self.splits["train"]

    @property
    def eval_split(self) -> str | None:
        """The split evaluated during training: validation if there is one, else test."""
        return next((s for s in ("validation", "test") if s in self.splits), None)


OUTER_KINDS = ("gradient", "evolution")
# Fields both outer loops take, with one meaning: they sit in `outer` itself.
SHARED_OUTER_FIELDS = ("batch_size", "steps_per_call")


def _outer_classes() -> dict[str, type]:
    from metalearn.outer.evolution import EvolutionOuterLoop
    from metalearn.outer.gradient import GradientOuterLoop

    return {"gradient": GradientOuterLoop, "evolution": EvolutionOuterLoop}


def _section_fields(cls: type) -> dict[str, Any]:
    skip = {*SHARED_OUTER_FIELDS, "total_steps", "shard", "strategy_params"}  # Python-only
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def outer_config(kind: str = "gradient", gradient: dict | None = None,
                 evolution: dict | None = None, **shared: Any) -> ConfigDict:
    """Config of the outer loop: `kind` picks `outer.gradient.*` or `outer.evolution.*`.

    `batch_size` (episodes per meta-step / per generation), `steps_per_call` and `shard` are
    shared; every other field lives in the section of the one loop that reads it.
    """
    classes = _outer_classes()
    if kind not in classes:
        raise ValueError(f"outer.kind={kind!r}; choose one of {', '.join(OUTER_KINDS)}")
    g = classes["gradient"]
    c = ConfigDict({"kind": kind, **{k: getattr(g, k) for k in SHARED_OUTER_FIELDS},
                    "shard": "auto"})
    for name, given in (("gradient", gradient), ("evolution", evolution)):
        section = _section_fields(classes[name])
        for k, v in (given or {}).items():
            if k not in section:
                raise KeyError(f"outer.{name} has no field {k!r}; fields: {sorted(section)}")
            section[k] = v
        c[name] = ConfigDict(section)
    for k, v in shared.items():
        if k not in c or k in OUTER_KINDS:
            raise KeyError(f"outer has no shared field {k!r}; shared fields: "
                           f"{[*SHARED_OUTER_FIELDS, 'shard']}; the others go in gradient={{...}}"
                           " or evolution={...}")
        c[k] = v
    return c


def upgrade_outer(outer: dict) -> dict:
    """An `outer` config of the runs made before the per-loop sections, in today's form."""
    if any(k in outer for k in OUTER_KINDS) or str(outer.get("kind")).startswith(CUSTOM):
        return outer
    shared = {k: outer[k] for k in (*SHARED_OUTER_FIELDS, "shard") if k in outer}
    sections = {k: {f: outer[f] for f in _section_fields(cls) if f in outer}
                for k, cls in _outer_classes().items()}
    from metalearn.outer.evolution import ADAM_STRATEGIES

    evo = sections["evolution"]
    if evo.get("strategy") not in ADAM_STRATEGIES:
        evo["learning_rate"] = None  # the field was ignored by these strategies
    kind = outer.get("kind", "gradient")
    return outer_config(kind, **sections, **shared).to_dict()


def used_outer(c: ConfigDict) -> ConfigDict:
    """`c` (an outer config) without the section of the loop kind it does not use."""
    return ConfigDict({k: v for k, v in c.items() if k not in OUTER_KINDS or k == c.kind})


def check_outer_sets(c: ConfigDict, sets: Sequence[str]) -> None:
    """Refuse `--set outer.SECTION.FIELD` for the section that `outer.kind` does not use."""
    for s in sets:
        parts = s.split("=", 1)[0].strip().split(".")
        if len(parts) >= 3 and parts[0] == "outer" and parts[1] in OUTER_KINDS \
                and parts[1] != c.kind:
            other = f"outer.{c.kind}.{parts[2]}"
            alt = (f"set {other} instead, or " if parts[2] in c[c.kind] else "")
            raise ValueError(f"{override('.'.join(parts))}: this run's loop is outer.kind="
                             f"{c.kind}, which reads outer.{c.kind}.*, not outer.{parts[1]}.*; "
                             f"{alt}add {override('outer.kind', parts[1])} to train with that "
                             "loop")


class _CustomObjectError(ValueError):
    """An outer config that records an object given in Python (not a name)."""


def build_outer(c: ConfigDict, total_steps: int = 0):
    """An OuterLoop from its config: `c.kind`'s section plus the shared fields."""
    if str(c.kind).startswith(CUSTOM):
        raise _CustomObjectError(f"its outer loop was a {c.kind[len(CUSTOM):]} object")
    classes = _outer_classes()
    if c.kind not in classes:
        raise ValueError(f"outer.kind={c.kind!r}; choose one of {', '.join(OUTER_KINDS)}")
    for k, v in c.get(c.kind, {}).items():
        if isinstance(v, str) and v.startswith(CUSTOM):
            raise _CustomObjectError(f"outer.{c.kind}.{k} was a {v[len(CUSTOM):]} object")
    if c.kind not in c:
        raise KeyError(f"outer.kind={c.kind!r} but the config has no outer.{c.kind} section")
    cls = classes[c.kind]
    kw = {**c[c.kind].to_dict(), **{k: c[k] for k in SHARED_OUTER_FIELDS}}
    kw["shard"] = {"auto": None, True: True, False: False}.get(c.get("shard", "auto"), None)
    if "total_steps" in {f.name for f in dataclasses.fields(cls)}:
        kw["total_steps"] = total_steps
    return cls(**kw)


def base_config(**overrides: Any) -> ConfigDict:
    """Fields every experiment has (steps, seed, evaluation, checkpoints, outer loop)."""
    c = ConfigDict({
        "experiment": "",
        "experiment_source": "",
        "seed": 0,
        "steps": 1000,
        "eval_every": 0,
        "eval_episodes": 1000,
        "eval_batch_size": 250,  # episodes per compiled evaluation call (memory vs speed)
        "test_episodes": 1000,
        "checkpoint_every": 0,
        "log_every": 1,
        "init_from": "",
        "outer": outer_config(),
    })
    for k, v in overrides.items():
        c[k] = v
    return c


BASE_DOCS = {
    "experiment": "the experiment's name (set by `metalearn train`)",
    "experiment_source": "where the experiment module was imported from: a module path or a "
                         "file (set by `metalearn train`; resume and evaluate import it again)",
    "seed": "seed of the run: initial meta-parameters and every episode drawn",
    "steps": "meta-steps in total (counting those before a --resume)",
    "eval_every": "evaluate on the validation (else test) split every N steps (0: at the end)",
    "eval_episodes": "episodes per periodic evaluation",
    "eval_batch_size": "episodes per compiled evaluation call (memory vs speed)",
    "test_episodes": "episodes of the final test evaluation (and of `metalearn evaluate`)",
    "checkpoint_every": "checkpoint every N steps (0: only at the end)",
    "log_every": "write training metrics every N steps",
    "init_from": "start from these meta-parameters instead of the learner's init: a run "
                 "directory (its latest checkpoint) or a name the learner offers (e.g. "
                 "gradient[:LR] for the Hebbian genome)",
    "outer.kind": "outer loop: gradient (outer.gradient.*) or evolution (outer.evolution.*)",
    "outer.batch_size": "episodes per meta-step (gradient) or per generation, shared by all "
                        "candidates (evolution)",
    "outer.steps_per_call": "meta-steps compiled into one call (speed only; same numbers)",
    "outer.shard": "split the batch / population across devices: auto, true or false",
}


def field_docs(module: Any = None) -> dict[str, str]:
    """One-line description of every config field: base fields, outer loops, the experiment's."""
    docs = dict(BASE_DOCS)
    for kind, cls in _outer_classes().items():
        for f in dataclasses.fields(cls):
            if "doc" in f.metadata:
                docs[f"outer.{kind}.{f.name}"] = f.metadata["doc"]
    docs.update(getattr(module, "DOCS", {}))
    return docs


def describe_config(config: ConfigDict, docs: dict[str, str]) -> list[tuple[str, Any, str]]:
    """(dotted name, value, description) of every field of `config`, in order."""
    rows = []

    def walk(node: ConfigDict, prefix: str) -> None:
        for k, v in node.items():
            name = prefix + k
            if isinstance(v, ConfigDict):
                walk(v, name + ".")
            else:
                rows.append((name, v, docs.get(name, "")))

    walk(config, "")
    return rows


CUSTOM = "custom: "  # config.json's value for a user object (an optax or evosax instance)


# ---------------------------------------------------------------- discovery and overrides


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


def _parse_value(text: str, current: Any) -> Any:
    low = text.strip().lower()
    if isinstance(current, bool) or low in ("true", "false"):
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if low in ("none", "null"):
        return None
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        v = text
    if isinstance(current, float) and isinstance(v, int):
        v = float(v)
    if isinstance(current, int) and isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(current, str) and not isinstance(v, str):
        v = text
    return v


def apply_overrides(config: ConfigDict, sets: Sequence[str]) -> ConfigDict:
    """Apply `key.sub=value` overrides; unknown keys and wrong types raise a clear error."""
    for s in sets:
        if "=" not in s:
            raise ValueError(f"{override(s)}: expected key=value")
        key, text = s.split("=", 1)
        parts = key.strip().split(".")
        node = config
        for i, p in enumerate(parts[:-1]):
            if p not in node or not isinstance(node[p], ConfigDict):
                raise KeyError(f"{override(key)}: {'.'.join(parts[:i + 1])!r} is not a config "
                               f"section; sections here: "
                               f"{sorted(k for k, v in node.items() if isinstance(v, ConfigDict))}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            where = [f"{'.'.join([*parts[:-1], k, leaf])}" for k, v in node.items()
                     if isinstance(v, ConfigDict) and leaf in v]
            where = where or ['.'.join([*parts[:-1], k]) for k in
                              difflib.get_close_matches(leaf, list(node.keys()), n=1)]
            hint = f" (did you mean {' or '.join(where)}?)" if where else ""
            raise KeyError(f"{override(key)}: no field {leaf!r}{hint}; fields here: "
                           f"{sorted(node.keys())}")
        cur = node[leaf]
        if isinstance(cur, ConfigDict):
            raise KeyError(f"{override(key)}: {key!r} is a section; set one of its fields: "
                           f"{sorted(cur.keys())}")
        try:
            val = _parse_value(text, cur)
        except ValueError as e:
            raise ValueError(f"{override(key, text)}: {e}") from None
        if cur is not None and val is not None and not isinstance(val, type(cur)) and not (
                isinstance(cur, float) and isinstance(val, int)):
            kind = type(cur).__name__
            article = "an" if kind[0] in "aeiou" else "a"
            raise TypeError(f"{override(key, text)}: expected {article} {kind} "
                            f"(current value {cur!r}), got {type(val).__name__}")
        with node.ignore_type():
            node[leaf] = val
    return config


# ---------------------------------------------------------------- train and evaluate


def cached_json(run: Run | None, name: str, compute: Callable[[], dict]) -> dict:
    """`compute()`, kept in the run directory as `name` and read back on later calls."""
    if run is not None and (run.path / name).exists():
        return run.read_json(name)
    value = compute()
    if run is not None:
        run.write_json(name, value)
    return value


def default_run_dir(name: str, seed: int) -> Path:
    """runs/NAME-sSEED-YYYYmmdd-HHMMSS."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name}-s{seed}-{stamp}"


def experiment_module(config: ConfigDict) -> ModuleType:
    """The module of a run's experiment: from `experiment_source`, else (runs made before it was
    recorded) by name."""
    return import_experiment(experiment_source(config))


def experiment_source(config: ConfigDict) -> str:
    """Where a run's experiment module is imported from."""
    return config.get("experiment_source") or resolve_experiment(config.experiment)[1]


def build_experiment(config: ConfigDict, run: Run | None = None) -> Experiment:
    """Build an experiment (learner, samplers) from its config."""
    return experiment_module(config).build(config, run)


def read_config(run: Run) -> ConfigDict:
    """The config of a run directory (runs of older versions upgraded to today's fields)."""
    if not (run.path / "config.json").exists():
        raise FileNotFoundError(
            f"{run.path} is not a metalearn run directory (no config.json); give the run "
            "directory of a `metalearn train` or `OuterLoop.run(run_dir=...)` run")
    d = run.read_json("config.json")
    d["outer"] = upgrade_outer(d["outer"])
    return ConfigDict(d)


def run_config(name: str, sets: Sequence[str] = (), seed: int | None = None,
               run_dir: str | Path | None = None, resume: bool = False) -> tuple[Path, ConfigDict]:
    """The run directory and config of a new run, or of the run in `run_dir` to resume.

    Overrides are applied and checked; the outer loop's unused section is dropped, so a run's
    config holds what it uses. Nothing is written.
    """
    if resume:
        if run_dir is None:
            raise ValueError(f"{arg('resume')} needs {arg('run_dir')}, the run directory to "
                             "continue")
        path = Path(run_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"cannot resume: {path / 'config.json'} does not exist; "
                                    "is this a run directory made by `metalearn train`?")
        config = read_config(Run(path, create=False))
        if not config.get("experiment"):
            raise ValueError(f"cannot resume {path} here: it was made from Python "
                             "(OuterLoop.run), not from an experiment; resume it in Python "
                             "with outer.run(..., run_dir=..., resume=True)")
        if name and resolve_experiment(name)[1] != experiment_source(config):
            raise ValueError(f"{path} is a run of {config.experiment!r} "
                             f"({experiment_source(config)}), not {name!r}")
    else:
        name, source = resolve_experiment(name)
        config = import_experiment(source).get_config()
        config.experiment, config.experiment_source = name, source
        if seed is not None:
            config.seed = seed
        path = Path(run_dir) if run_dir else None
    apply_overrides(config, sets)
    check_outer_sets(config.outer, sets)
    build_outer(config.outer, config.steps)  # its own checks (names, ranges), before any work
    config.outer = used_outer(config.outer)
    return path or default_run_dir(name, config.seed), config


def train(name: str, sets: Sequence[str] = (), seed: int | None = None,
          run_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True, from_step: int | None = None) -> tuple[Run, dict]:
    """Train experiment `name` (or resume the run in `run_dir`); returns (run, summary).

    A resume continues from the latest checkpoint, or from `from_step`'s. It changes nothing
    in the run directory before training starts, and config.json only once it has finished.
    A new run refuses a directory where another run has trained."""
    if from_step is not None and not resume:
        raise ValueError(f"{arg('from_step')} goes with {arg('resume')}: it picks the "
                         "checkpoint to resume from")
    path, config = run_config(name, sets, seed, run_dir, resume)
    if not resume and path.is_dir() and Run(path, create=False).holds_a_run():
        cont = (f"`metalearn train --run-dir {path} --resume`" if in_cli() else
                f"train(run_dir={str(path)!r}, resume=True)")
        raise FileExistsError(
            f"{path} already holds a run (metrics.jsonl or checkpoints/); continue it with "
            f"{cont}, or choose a new run directory ({arg('run_dir')}) or delete that one")
    made = not path.exists()
    run = Run(path)
    if progress:
        print(f"run directory: {run.path}", flush=True)
    try:
        exp = build_experiment(config, run)
    except BaseException:
        if made:  # a check that failed while building leaves no directory behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    tasks = {k: s.describe() for k, s in exp.splits.items()}
    if not resume:  # a resume rewrites config.json and tasks.json once it has trained (below)
        run.write_json("config.json", config.to_dict())
        run.write_json("tasks.json", tasks)
    try:
        result = meta_train(config, exp, run, resume, progress, from_step)
        if resume:
            run.write_json("config.json", config.to_dict())
            run.write_json("tasks.json", tasks)
        if progress and (plan := final_episodes(config, exp)):
            print(plan, flush=True)
        summary = summarize_run(config, exp, run, result, progress)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(run, config.steps)) from None
    run.write_json("summary.json", summary)
    return run, summary


def final_episodes(config: ConfigDict, exp: Experiment) -> str:
    """What the final evaluation will run, said before it starts (it can take longer than a
    short training): the test episodes and, where the config has them, the report's."""
    parts, total = [], 0
    if "test" in exp.splits:
        parts.append(f"test {config.test_episodes} episodes")
        total += config.test_episodes
    settings = config.get("report_settings")
    if exp.report is not None and isinstance(settings, str) and settings.strip():
        n = len([x for x in settings.split(",") if x.strip()])
        each = config.get("report_episodes", 0)
        parts.append(f"report {n} setting{'s' if n != 1 else ''} x {each} episodes")
        total += n * each
    if not parts:
        return ""
    return f"final evaluation: {' + '.join(parts)} ({total} episodes)"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `train`: its message says where the run stands and how to continue."""


def interrupted_message(run: Run, steps: int) -> str:
    """Where an interrupted run stands: the step its metrics reached, its newest checkpoint
    and the command (or call) that continues it."""
    ckpts = sorted(int(p.name) for p in run.checkpoint_dir.glob("*") if p.name.isdigit()) \
        if run.checkpoint_dir.is_dir() else []
    reached = max((r["step"] for r in run.metrics() if r.get("split") == "train"), default=0)
    cont = (f"`metalearn train --run-dir {run.path} --resume`" if in_cli() else
            f"train(run_dir={str(run.path)!r}, resume=True)")
    if not ckpts:
        return (f"interrupted at step {reached} of {steps}, before the first checkpoint: "
                f"nothing to resume; start again with a new run directory or delete {run.path}")
    what = ("training had finished; the final evaluation did not" if ckpts[-1] >= steps else
            f"its last checkpoint is step {ckpts[-1]}")
    return (f"interrupted at step {reached} of {steps} ({what}, in {run.checkpoint_dir}); "
            f"continue with {cont}")


def meta_train(config: ConfigDict, exp: Experiment, run: Run, resume: bool = False,
               progress: bool = True, from_step: int | None = None):
    """Run the config's outer loop on the experiment; returns its `TrainResult`."""
    from metalearn.outer.base import RunOptions

    split = exp.eval_split
    init = None if resume else initial_meta_from(config.get("init_from", ""), exp.learner)
    return build_outer(config.outer, config.steps).run(
        exp.learner, exp.train, jax.random.PRNGKey(config.seed), steps=config.steps,
        eval_sampler=exp.splits.get(split) if split else None, run_dir=run.path,
        config=config.to_dict(), resume=resume, from_step=from_step,
        options=RunOptions(eval_every=config.eval_every, eval_episodes=config.eval_episodes,
                           eval_batch_size=config.eval_batch_size,
                           checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                           progress=progress),
        eval_learner=exp.eval_learner, init_meta=init)


def initial_meta_from(spec: str, learner: InnerLearner) -> MetaParams | None:
    """The meta-parameters `init_from` names: None for "", a run directory's trained ones, or
    one the learner offers by name (`learner.named_meta(name)`)."""
    if not spec:
        return None
    if Path(spec).is_dir():
        from metalearn.reload import load_run

        return load_run(spec).meta
    named = getattr(learner, "named_meta", None)
    if named is None:
        raise ValueError(f"{override('init_from', spec)}: {spec!r} is not a run directory, and "
                         f"{type(learner).__name__} offers no named meta-parameters")
    return named(spec)


def summarize_run(config: ConfigDict, exp: Experiment, run: Run | None, result: Any,
                  progress: bool = False) -> dict:
    """summary.json: speed, final train loss, the last evaluation, the test split, the report."""
    from metalearn.outer.base import training_summary

    summary: dict[str, Any] = {"experiment": config.experiment, "steps": config.steps,
                               "seed": config.seed, **training_summary(result)}
    split = exp.eval_split
    if result.final_eval is not None and split != "test":
        summary[split] = result.final_eval
    if "test" in exp.splits:
        summary["test"] = evaluate_split(config, exp, result.meta,
                                          progress="test" if progress else None)
    if exp.report is not None:
        summary.update(exp.report(exp, result.meta, run, config, progress=progress))
    return summary


def evaluate_split(config: ConfigDict, exp: Experiment | LoadedRun, meta: MetaParams,
                    seed: int = 0, episodes: int | None = None,
                    sampler: TaskSampler | None = None, progress: str | None = None) -> dict:
    """The run's test figures (or `sampler`'s): `test_episodes` episodes from the test seed."""
    key = jax.random.PRNGKey(TEST_SEED)
    if seed:
        key = jax.random.fold_in(key, seed)
    return evaluate(exp.evaluator, meta, sampler or exp.splits["test"], key,
                    episodes or config.test_episodes, config.eval_batch_size, progress=progress)

"""Omniglot under a standard protocol, shared by the few-shot image experiments (ProtoNet, ...).

The same protocol (`data.protocol`: vinyals, lake, ht or minimal; `metalearn.tasks.data.omniglot`),
split, samplers, configuration fields and test report, so that the learners' results are
comparable row by row.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from metalearn.core import MetaParams
from metalearn.evaluation import evaluate
from metalearn.experiment import ConfigDict, Experiment, base_config, comma_list, outer_config
from metalearn.runs import Run
from metalearn.seeds import REPORT_SEED
from metalearn.tasks.augment import from_setting
from metalearn.tasks.data.datasets import ImageDataset
from metalearn.tasks.data.omniglot import (
    PROTOCOLS,
    ROTATIONS,
    get_protocol,
    load_protocol,
    protocol_split,
)
from metalearn.tasks.data.splits import load_split, save_split
from metalearn.tasks.fewshot import FewShotSampler

SPLIT_FILE = "split.json"
OLD_RUNS_PROTOCOL = "minimal"  # runs made before data.protocol existed


def base_omniglot_config(**overrides: Any) -> ConfigDict:
    """Data, task, evaluation and report fields: the Vinyals protocol, 20-way 1-shot."""
    c = base_config(steps=2000, eval_every=500, eval_episodes=50, test_episodes=1000,
                    checkpoint_every=500, log_every=1, eval_batch_size=25)
    c.data = ConfigDict({"protocol": "vinyals", "paths": "", "image_size": 28,
                         "train_alphabets": "", "validation_alphabets": "",
                         "test_alphabets": "", "on_error": "raise"})
    c.task = ConfigDict({"ways": 20, "shots": 1, "queries": 5, "unlabeled": 0,
                         "rotations": "auto", "eval_rotations": "auto",
                         "normalize": "invert", "eval_ways": 0, "eval_queries": 5,
                         "within_group": False, "eval_within_group": False,
                         "group_weighting": "classes", "augment": "none",
                         "augment_strength": 1.0})
    # WAYSxSHOTSxQUERIES[+UNLABELED][@group] per class, evaluated on test by `report` besides
    # the trained setting; +U adds U unlabeled images per class (semi-supervised learners),
    # @group draws each episode's classes from one alphabet
    c.report_settings = "20x5x5,5x1x15"
    c.report_episodes = 1000
    c.outer = outer_config("gradient", gradient={"learning_rate": 1e-3}, batch_size=2,
                           steps_per_call=10)
    for k, v in overrides.items():
        c[k] = v
    return c


DOCS = {
    "data.protocol": "the Omniglot protocol: " + "; ".join(
        f"{p.name}: {p.summary}" for p in PROTOCOLS.values()),
    "data.paths": "Omniglot zips or folders, comma-separated (empty: the protocol's, "
                  "../shared/data/omniglot/full or, for minimal, ../shared/data/omniglot; or "
                  "$METALEARN_OMNIGLOT)",
    "data.image_size": "images are resized to this many pixels a side",
    "data.train_alphabets": "alphabets to meta-train on, comma-separated (empty: the "
                            "protocol's split; any alphabet given: this alphabet split instead)",
    "data.validation_alphabets": "alphabets of the periodic evaluations (with train_alphabets)",
    "data.test_alphabets": "held-out alphabets of the final test (with train_alphabets)",
    "data.on_error": "a file that is not a readable image: raise (stop, naming it) or skip "
                     "(leave it out, with a warning)",
    "task.ways": "classes per episode (N)",
    "task.shots": "labelled support images per class (K)",
    "task.queries": "query images per class in training episodes",
    "task.unlabeled": "unlabeled images per class (semi-supervised learners)",
    "task.rotations": "training episodes: the 4 rotations of a character are 4 classes "
                      "(classes), one random rotation per class (augment), none, or auto "
                      "(the protocol's: vinyals, lake, minimal classes; ht augment)",
    "task.eval_rotations": "validation and test episodes: classes, none or auto (the "
                           "protocol's: vinyals classes, the others none)",
    "task.normalize": "pixel scaling: unit, centered, standard, invert or none",
    "task.eval_ways": "classes per validation and test episode (0: task.ways; fewer for "
                      "ProtoNet and the HyperTransformer, which masks the logits of classes "
                      "without support images; MAML's head has task.ways outputs)",
    "task.eval_queries": "query images per class in validation and test episodes",
    "task.within_group": "training episodes draw their classes from one alphabet (Lake et "
                         "al.'s within-alphabet task) instead of across alphabets",
    "task.eval_within_group": "validation and test episodes draw their classes from one "
                              "alphabet (always under the lake protocol)",
    "task.group_weighting": "within-alphabet episodes: choose the alphabet in proportion to its "
                            "classes (classes) or uniformly (uniform)",
    "task.augment": "training images: random affine distortion (Koch et al. 2015) per image "
                    "(image), one per class of the episode (class), or none",
    "task.augment_strength": "scales the distortion ranges (1: rotation 10 degrees, shear 0.3, "
                             "scale 0.2, translation 2/105 of the side)",
    "report_settings": "extra test settings WAYSxSHOTSxQUERIES[+UNLABELED][@group], "
                       "comma-separated",
    "report_episodes": "test episodes per report setting",
}


def protocol_of(config: ConfigDict) -> str:
    """The run's `data.protocol` (runs made before the field: minimal)."""
    return config.data.get("protocol", OLD_RUNS_PROTOCOL)


def rotation_mode(value: str | bool, default: str, field: str) -> str:
    """A rotation setting as one of ROTATIONS: 'auto' is the protocol's `default`, and the
    booleans of runs made before the modes mean classes (true) or none (false)."""
    if isinstance(value, bool) or value is None:  # `--set task.rotations=none` reads as None
        return "classes" if value else "none"
    if value == "auto":
        return default
    if value not in ROTATIONS:
        raise ValueError(f"{field}={value!r}: use auto, {', '.join(ROTATIONS)}")
    return value


def check_config(config: ConfigDict) -> None:
    """The protocol, rotation and report settings, checked before any data is read."""
    get_protocol(protocol_of(config))
    parse_settings(config.get("report_settings", ""))
    t = config.task
    rotation_mode(t.rotations, "none", "task.rotations")
    if rotation_mode(t.get("eval_rotations", "auto"), "none", "task.eval_rotations") == \
            "augment":
        raise ValueError("task.eval_rotations=augment: test episodes are not augmented; use "
                         "classes, none or auto")


def _splits(config: ConfigDict, run: Run | None) -> dict[str, ImageDataset]:
    """The protocol's split of the Omniglot classes (or the alphabet split the config names);
    kept in the run so evaluation reuses it."""
    d = config.data
    protocol = protocol_of(config)
    ds = load_protocol(protocol, comma_list(d.paths) or None, image_size=d.image_size,
                       on_error=d.get("on_error", "raise"))  # runs made before the field
    path = run.path / SPLIT_FILE if run is not None else None
    if path is not None and path.exists():
        return load_split(path, ds)
    alphabets = {"train": comma_list(d.train_alphabets),
                 "validation": comma_list(d.validation_alphabets),
                 "test": comma_list(d.test_alphabets)}
    custom = any(alphabets.values())
    splits = protocol_split(ds, protocol, alphabets if custom else None)
    if path is not None:
        save_split(path, splits, {"protocol": protocol, "by": "alphabet" if custom else protocol})
    return splits


def samplers(config: ConfigDict, run: Run | None) -> dict[str, FewShotSampler]:
    """The train sampler and the validation/test samplers, rotations as the protocol says."""
    check_config(config)
    t = config.task
    proto = get_protocol(protocol_of(config))
    data = _splits(config, run)
    opt = lambda k, default: t.get(k, default)  # runs made before the field
    weighting = opt("group_weighting", "classes")
    train_rot = rotation_mode(t.rotations, proto.train_rotations, "task.rotations")
    eval_rot = rotation_mode(opt("eval_rotations", "auto"), proto.eval_rotations,
                             "task.eval_rotations")
    train = FewShotSampler(data["train"], t.ways, t.shots, t.queries, t.unlabeled,
                           rotations=train_rot == "classes",
                           random_rotation=train_rot == "augment", normalize=t.normalize,
                           within_group=opt("within_group", False), group_weighting=weighting,
                           augment=from_setting(opt("augment", "none"),
                                                opt("augment_strength", 1.0)))
    splits = {"train": train}
    for name in ("validation", "test"):
        if name in data:
            splits[name] = FewShotSampler(
                data[name], opt("eval_ways", 0) or t.ways, t.shots, t.eval_queries, t.unlabeled,
                rotations=eval_rot == "classes", normalize=t.normalize,
                within_group=opt("eval_within_group", False) or proto.eval_within_group,
                group_weighting=weighting)
    return splits


class Setting(NamedTuple):
    """One report setting: N-way K-shot, Q queries and U unlabeled per class, within a group."""

    ways: int
    shots: int
    queries: int
    unlabeled: int = 0
    within_group: bool = False


def parse_settings(text: str) -> list[Setting]:
    """'20x5x5,20x1x5+5,20x1x5@group' -> [Setting(ways, shots, queries, unlabeled, within)]."""
    out = []
    for part in comma_list(text):
        body, at, where = part.partition("@")
        head, plus, unl = body.partition("+")
        nums = head.split("x") + ([unl] if plus else ["0"])
        if len(nums) != 4 or not all(n.isdigit() for n in nums) or (at and where != "group"):
            raise ValueError(f"report setting {part!r}: expected WAYSxSHOTSxQUERIES, "
                             "optionally +UNLABELED and @group, e.g. 5x1x15, 20x1x5+5 or "
                             "20x1x5@group")
        out.append(Setting(*(int(n) for n in nums), within_group=bool(at)))
    return out


def report_plan(config: ConfigDict) -> tuple[str, int]:
    """The report's settings and episodes, in words and in all."""
    n, each = len(parse_settings(config.report_settings)), config.report_episodes
    return f"report {n} setting{'s' if n != 1 else ''} x {each} episodes", n * each


def report(exp: Experiment, meta: MetaParams, run: Run | None, config: ConfigDict,
           progress: bool = False) -> dict:
    """Test accuracy (95% CI) at the extra N-way K-shot settings of `config.report_settings`."""
    import jax

    if "test" not in exp.splits:
        return {}
    test = exp.splits["test"]
    out: dict = {"test_setting": f"{test.ways}-way {test.shots}-shot, {test.queries} queries "
                                 "per class"}
    lines = []
    for i, (ways, shots, queries, unl, within) in enumerate(
            parse_settings(config.report_settings)):
        sampler = test.replace(ways=ways, shots=shots, queries=queries, unlabeled=unl,
                               within_group=within)
        name = f"{ways}way_{shots}shot" + ("_within_group" if within else "")
        extra = (f" + {unl} unlabeled per class" if unl else "") + \
            (", within an alphabet" if within else "")
        res = evaluate(exp.evaluator, meta, sampler, jax.random.PRNGKey(REPORT_SEED + i),
                       config.report_episodes, batch_size=config.eval_batch_size,
                       progress=f"test {ways}-way {shots}-shot{extra}" if progress else None)
        out[f"test_{name}" + (f"_{unl}unlabeled" if unl else "")] = res
        lines.append(f"test {ways}-way {shots}-shot{extra}: accuracy "
                     f"{100 * res['accuracy']:.2f} ± {100 * res['accuracy_ci95']:.2f} % "
                     f"({res['episodes']} episodes)")
    out["table"] = "\n".join(lines)
    return out

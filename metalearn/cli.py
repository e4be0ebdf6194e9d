"""The `metalearn` command line: list, config, train, evaluate, compare."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _cmd_list(args: argparse.Namespace) -> int:
    from metalearn.discovery import list_experiments

    exps = list_experiments()
    width = max((len(n) for n, _ in exps), default=0)
    for name, doc in exps:
        print(f"{name:<{width}}  {doc}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from metalearn.config import apply_overrides, describe_config, field_docs
    from metalearn.discovery import import_experiment, resolve_experiment

    name, source = resolve_experiment(args.experiment)
    mod = import_experiment(source)
    config = mod.get_config()
    config.experiment, config.experiment_source = name, source
    apply_overrides(config, args.set or [])
    rows = describe_config(config, field_docs(mod))
    name_w = max(len(n) for n, _, _ in rows)
    val_w = min(24, max(len(repr(v)) for _, v, _ in rows))
    print(f"{name}: {((mod.__doc__ or '').strip().splitlines() or [''])[0]}")
    print("override any field with --set NAME=VALUE; outer.kind=KIND picks the section "
          "outer.KIND.* that builds the outer loop\n")
    for name, value, doc in rows:
        print(f"{name:<{name_w}}  {value!r:<{val_w}}  {doc}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from metalearn.training import train

    if args.distributed:
        from metalearn.distributed import initialize

        initialize()  # coordinator and process ids from the environment
    from metalearn.distributed import is_primary
    from metalearn.evaluation import format_metrics

    run, summary = train(args.experiment, args.set or [], seed=args.seed, run_dir=args.run_dir,
                         resume=args.resume, progress=not args.no_progress and is_primary(),
                         from_step=args.from_step, quick=args.quick)
    if not is_primary():
        return 0
    if args.no_progress:  # with progress, `train` said it before it started
        print(f"run directory: {run.path}")
    for split in ("validation", "test"):
        if isinstance(summary.get(split), dict):
            print(f"{split:>10}: {format_metrics(summary[split])}  "
                  f"({summary[split].get('episodes')} episodes)")
    if "table" in summary:
        print(summary["table"])
    print(f"summary: {run.path / 'summary.json'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from metalearn import reload
    from metalearn.evaluation import format_metrics

    if args.manifest and args.dataset:
        raise ValueError("--manifest and --dataset cannot be combined: a manifest lists its "
                         "own episodes; give one of them")
    # flags checked before the run and its data load: an impossible count fails at once
    for flag, lo in (("episodes", 1), ("ways", 1), ("shots", 1), ("queries", 1),
                     ("unlabeled", 0)):
        v = getattr(args, flag)
        if v is not None and v < lo:
            raise ValueError(f"--{flag} {v}: must be at least {lo} (omit it for the run's own)")
    if args.manifest:
        res = reload.evaluate_manifest(args.run_dir, args.manifest)
    else:
        settings = {k: getattr(args, k) for k in reload.SETTINGS}
        settings["within_group"] = True if args.within_group else None
        res = reload.evaluate_run(args.run_dir, args.split, args.episodes, args.seed,
                                  progress=not args.no_progress, dataset=args.dataset,
                                  on_error=args.on_error, baselines=not args.no_baselines,
                                  against=args.against or (), inner_steps=args.inner_steps,
                                  **settings)
    where = res.get("split", "manifest") + "".join(
        f" {k}={v}" for k, v in res.get("setting", {}).items() if v is not False)
    seed = f", seed {res['seed']}" if "seed" in res else ""
    steps = f", {res['inner_steps']} inner steps" if "inner_steps" in res else ""
    print(f"{where} (step {res.get('step')}, {res.get('episodes')} episodes{seed}{steps}): "
          f"{format_metrics(res)}")
    beside = {**res.get("against", {}), **res.get("baselines", {})}
    if beside:
        print("beside it, on the same episodes (difference: this run minus it, episode by "
              "episode):")
        width = max(map(len, beside))
        for name, metrics in beside.items():
            diff = metrics["difference"]
            k = "accuracy" if "accuracy" in diff else "loss"
            print(f"  {name:<{width}}  {format_metrics(metrics)}  difference "
                  f"{k}={diff[k]:+.4f} ± {diff[k + '_ci95']:.4f}")
    if args.json:
        print(json.dumps(res, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `metalearn` command."""
    p = argparse.ArgumentParser(
        prog="metalearn",
        description="Meta-learning in JAX: train and evaluate the experiments in experiments/.")
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback (`metalearn --debug train ...`)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments, one line each").set_defaults(
        fn=_cmd_list)
    c = sub.add_parser("config", help="every config field of an experiment: value and meaning")
    c.add_argument("experiment", help="experiment: a name (see `metalearn list`), a module "
                   "or a .py file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="show the config with these overrides applied")
    c.set_defaults(fn=_cmd_config)
    t = sub.add_parser("train", help="meta-train an experiment")
    t.add_argument("experiment", nargs="?", default="",
                   help="experiment: a name (see `metalearn list`), a module (mypkg.my_exp) or "
                        "a file (path/to/my_exp.py); optional with --resume")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set steps=500 --set outer.batch_size=64 "
                        "(`metalearn config EXPERIMENT` lists them)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default: config.seed)")
    t.add_argument("--run-dir", default=None, help="run directory (default: runs/NAME-sSEED-TIME)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its latest checkpoint")
    t.add_argument("--from-step", type=int, default=None, metavar="N",
                   help="with --resume: continue from the checkpoint of step N instead (later "
                        "checkpoints are set aside in rejected_checkpoints/)")
    t.add_argument("--quick", action="store_true",
                   help="a smoke run of about a minute: 20 steps, 20 test and report episodes "
                        "and the experiment's cheaper settings (--set still applies on top)")
    t.add_argument("--no-progress", action="store_true",
                   help="quiet: no progress bars or status lines")
    t.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (run the same "
                        "command on every host)")
    t.set_defaults(fn=_cmd_train)
    e = sub.add_parser("evaluate", help="evaluate a trained run on held-out episodes or on "
                       "a dataset of your own")
    e.add_argument("run_dir", help="a run directory (of `metalearn train`, or of "
                   "OuterLoop.run(run_dir=...) when its learner and samplers can be rebuilt)")
    e.add_argument("--split", default=None,
                   help="split to evaluate (default: test, else the run's evaluation split)")
    e.add_argument("--episodes", type=int, default=None,
                   help="number of episodes (default: the run's test_episodes)")
    e.add_argument("--seed", type=int, default=0,
                   help="seed of the evaluation episodes (default 0: the test episodes "
                        "`metalearn train` reported on)")
    e.add_argument("--manifest", default=None,
                   help="evaluate on the fixed episodes listed in this manifest file")
    e.add_argument("--dataset", default=None, metavar="SPEC",
                   help="few-shot image runs: draw the episodes from your own dataset, resized "
                        "and converted to the run's images: an image folder (class/*.png or "
                        "group/class/*.png) or a zip of one; two MNIST-format IDX files "
                        "IMAGES,LABELS (e.g. t10k-images-idx3-ubyte.gz,t10k-labels-idx1-ubyte"
                        ".gz) or a folder holding one such pair; or a .npz with arrays x "
                        "[N,H,W(,C)] uint8 and y [N] labels. Saves eval_dataset_NAME.json")
    for flag, what in (("ways", "classes per episode (N)"), ("shots", "labelled images per "
                       "class (K)"), ("queries", "query images per class"),
                       ("unlabeled", "unlabeled images per class (semi-supervised learners)")):
        e.add_argument(f"--{flag}", type=int, default=None,
                       help=f"few-shot runs: {what}; default: the run's")
    e.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="--dataset: a file that is not a readable image stops the evaluation "
                        "(raise) or is left out with a warning (skip)")
    e.add_argument("--within-group", action="store_true",
                   help="few-shot runs: draw each episode's classes from one group (an "
                        "alphabet of Omniglot), chosen in proportion to its classes")
    e.add_argument("--no-baselines", action="store_true",
                   help="leave out the experiment's baselines (learned-rule runs: SGD and Adam "
                        "at their tuned rates), scored by default on the same episodes")
    e.add_argument("--against", action="append", metavar="RUN_DIR",
                   help="also score another run's learner on the same episodes (a run of the "
                        "same tasks), with the paired difference; repeat for more runs")
    e.add_argument("--inner-steps", type=int, default=None, metavar="N",
                   help="score every learner (the run's, the baselines, --against runs) after "
                        "N inner steps instead of its own (learned rules, MAML, SGD/Adam "
                        "baselines), e.g. 10x the meta-training unroll; saves "
                        "eval_SPLIT_steps<N>.json")
    e.add_argument("--json", action="store_true", help="also print the result as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(fn=_cmd_evaluate)
    from metalearn.compare import add_parser

    add_parser(sub)
    return p


def hugepages_env(environ: Mapping[str, str], thp_mode: str | None) -> dict[str, str] | None:
    """`environ` with glibc's malloc on transparent huge pages, or None where that changes
    nothing (already set, THP mode `always` or `never`, METALEARN_HUGEPAGES=0).

    XLA:CPU takes a compiled step's temporaries (288 MB for an 8-channel ProtoNet step) from
    malloc on every call, and glibc maps and unmaps blocks that large each time: every 4 KB page
    faults anew (0.19 s of system time per 8-channel step here). With huge pages advised the
    step took 352-360 ms against 428-451 ms (PyTorch's CPU step gains 2x the same way).
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get("METALEARN_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in tunables
            or thp_mode is None or "[madvise]" not in thp_mode):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGEPAGES_TUNABLE]))}


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode line on Linux with glibc, else None."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return THP_MODE.read_text()
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `metalearn` command."""
    from metalearn.messages import cli_mode

    if argv is None and sys.executable and (env := hugepages_env(os.environ, thp_mode())):
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # same command
        except OSError:
            pass  # run on with the default malloc
    args = build_parser().parse_args(argv)
    try:
        with cli_mode(args.command):
            return args.fn(args)
    except BrokenPipeError:  # `metalearn config NAME | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError,
            FloatingPointError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"metalearn: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # one line, not JAX's traceback; the run's files are kept
        if args.debug:
            raise
        print(f"metalearn: {e}" if str(e) else "metalearn: interrupted", file=sys.stderr)
        return 130


def _message(e: Exception) -> str:
    """An exception as one line for the user: our messages as they are; a bare KeyError or an
    empty message (a bug, not bad input) says so and where to look."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, KeyError) and (not isinstance(msg, str) or " " not in msg) or not msg:
        return (f"internal error: {type(e).__name__}({msg!r}); please report it with the "
                "traceback that `metalearn --debug ...` prints")
    return str(msg)


if __name__ == "__main__":
    sys.exit(main())

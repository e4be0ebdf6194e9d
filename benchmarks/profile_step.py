"""Where a few-shot CNN meta-step spends its time: XLA's own per-operation timings, by part.

Runs `benchmarks/protonet.py`'s setting (20-way 1-shot, 15 queries per class, 8 episodes per
step, Adam) for one learner at one width under `jax.profiler`, reads the per-operation events of
the Perfetto trace, maps each compiled operation to the named scope it came from
(`conv_pool`: convolution and pooling, `conv_input_grad`, `conv_kernel_grad`, `batch_stats`,
`bn_relu`: normalisation and ReLU, in `metalearn.nn`;
`prototypes` in ProtoNet; `sampling` and `optimizer` in the gradient outer loop) and whether it
is forward or backward, and prints milliseconds per step for each part, their share of the
summed operation time, the wall time per step, and XLA's buffer sizes (arguments, outputs,
temporaries) with the largest temporaries' shapes. Operation times are summed over both
threads, so they can add up to more than the wall time.

Usage: python benchmarks/profile_step.py [--width 8] [--learner protonet] [--steps 3]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protonet import LEARNERS, _sampler, make_learner  # noqa: E402

from metalearn.outer.gradient import GradientOuterLoop  # noqa: E402

SCOPES = ("sampling", "conv_kernel_grad", "conv_input_grad", "conv_pool", "batch_stats",
          "bn_relu", "prototypes", "optimizer")


def part(op_name: str) -> str:
    """The profile category of an operation from its HLO op_name (innermost known scope)."""
    names = op_name.split("/")
    for name in reversed(names):
        scope = re.sub(r"^.*\(|\)+$", "", name)  # transpose(jvp(conv)) -> conv
        if scope in SCOPES:
            backward = scope not in ("conv_kernel_grad", "conv_input_grad", "sampling",
                                     "optimizer") and "transpose(" in op_name
            return f"{scope} (backward)" if backward else scope
    return "other (loss, metrics, glue)"


def op_names(hlo: str) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata; an instruction without one (e.g. a dot
    inside a loop body) takes the op_name of a named instruction of the same computation."""
    out: dict[str, str] = {}
    members: list[str] = []
    for line in hlo.splitlines():
        if line.endswith("{"):  # a computation starts
            members = []
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', m.group(2))
        out[m.group(1)] = op.group(1) if op else ""
        members.append(m.group(1))
        if op:
            for name in members:
                out[name] = out[name] or op.group(1)
    return out


def main() -> None:
    """Profile `--steps` meta-steps and print the breakdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--learner", default="protonet", choices=LEARNERS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ops", type=int, default=0, help="also list the N slowest operations")
    args = ap.parse_args()
    sampler, source = _sampler(20, 1, 15)
    learner = make_learner(args.learner, args.width)
    outer = GradientOuterLoop(batch_size=args.batch, steps_per_call=1)
    state = outer.init(learner, sampler, jax.random.PRNGKey(0))
    compiled = outer.compiled_steps(learner, sampler).lower(state, 1).compile()
    names = op_names(compiled.as_text())
    state, m = compiled(state)
    jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, m = compiled(state)
                jax.block_until_ready(m)
        wall = (time.perf_counter() - t) / args.steps
        trace = next(Path(tmp).rglob("*perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_part: collections.Counter = collections.Counter()
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in names:
            per_part[part(names[e["name"]])] += e["dur"] / 1e3 / args.steps
            per_op[e["name"]] += e["dur"] / 1e3 / args.steps
    total = sum(per_part.values())
    print(f"{args.learner} at {args.width} channels, 20-way 1-shot 15-query, {args.batch} "
          f"episodes per step [{source}]; jax {jax.__version__}")
    print(f"wall time per step (under the profiler) {1e3 * wall:.0f} ms; operations "
          f"{total:.0f} ms summed over threads")
    for name, ms in per_part.most_common():
        print(f"  {name:28s} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
    if args.ops:
        for name, ms in per_op.most_common(args.ops):
            print(f"    {ms:7.1f} ms  {name:32s} {names[name][-90:]}")
    mem = compiled.memory_analysis()
    print(f"XLA buffers: arguments {mem.argument_size_in_bytes / 2**20:.0f} MB, outputs "
          f"{mem.output_size_in_bytes / 2**20:.0f} MB, temporaries "
          f"{mem.temp_size_in_bytes / 2**20:.0f} MB")
    sizes = collections.Counter()
    for m_ in re.finditer(r"= f32\[([\d,]+)\]\S* (?:fusion|convolution|dot|custom-call)\(",
                          compiled.as_text()):
        sizes[m_.group(1)] = 4 * math.prod(map(int, m_.group(1).split(","))) / 2**20
    print("largest f32 results (MB): " + ", ".join(
        f"[{k}] {v:.0f}" for k, v in sizes.most_common(6)))


if __name__ == "__main__":
    main()

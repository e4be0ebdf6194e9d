"""HyperTransformer meta-steps per second and peak memory against ProtoNet at the same width.

The issue's setting: 20-way 1-shot, 15 queries per class, 8 episodes per meta-step, 8 channels,
Adam, in one run with ProtoNet, each learner in its own process (its own peak RSS); the time per
step of the HyperTransformer generating every layer (`ht`) and the logits layer only
(`ht_logits`) is printed as a ratio to ProtoNet's. This is `benchmarks/protonet.py` with these
learners and width as defaults; its other options (--widths, --batch, --chunk) apply.

Usage: python benchmarks/hypertransformer.py [--widths 8] [--learners protonet ht ht_logits]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import protonet  # noqa: E402  (benchmarks/protonet.py, next to this file)

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("--learners") for a in args):
        args += ["--learners", "protonet", "ht", "ht_logits"]
    if not any(a.startswith("--widths") for a in args):
        args += ["--widths", "8"]
    sys.argv = [sys.argv[0], *args]
    protonet.main()

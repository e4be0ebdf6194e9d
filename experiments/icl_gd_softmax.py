"""Transformers learn in context by GD: a 1-layer softmax self-attention (2 heads) vs GD.

The same experiment as `icl_gd` with `model.softmax = True` and `model.num_heads = 2` (the
paper's code notes that softmax attention needs at least two heads to align with GD);
`--set model.num_heads=1` gives the 1-head run.
"""

from __future__ import annotations

from metalearn.experiment import ConfigDict
from metalearn.experiments import icl_gd

build = icl_gd.build
DOCS = icl_gd.DOCS


def get_config() -> ConfigDict:
    """`icl_gd` with softmax attention and two heads."""
    c = icl_gd.get_config()
    c.model.softmax = True
    c.model.num_heads = 2
    return c

"""Transformers learn in context by GD: a 2-layer weight-tied LSA vs 2 steps of GD and GD++.

The same experiment as `icl_gd` with `model.num_layers = 2` (recurrent: one layer applied twice);
`--set model.num_layers=3` gives the 3-layer run. GD and GD++ take as many steps as there are
layers, their step sizes line-searched on training tasks.
"""

from __future__ import annotations

from metalearn.experiment import ConfigDict
from metalearn.experiments import icl_gd

build = icl_gd.build
DOCS = icl_gd.DOCS


def get_config() -> ConfigDict:
    """`icl_gd` with a 2-layer recurrent LSA."""
    c = icl_gd.get_config()
    c.model.num_layers = 2
    return c

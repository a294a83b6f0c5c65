"""InherNet in JAX: inherit a trained teacher instead of distilling a student.

Public API::

  import inhernet_jax as ij
  new_params = ij.inherit(teacher_params, 32, heads=3)
  spec = ij.InherSpec(rank=32, heads=3)
  model = MyModel(spec=spec)   # built from ij.layers.InherDense / InherConv
"""

from inhernet_jax import accounting, budget, layers, sizes, svd
from inhernet_jax.budget import allocate
from inhernet_jax.inherit import (
    format_report,
    inherit,
    inherit_report,
    planned_param_count,
    resolve,
)
from inhernet_jax.layers import InherConv, InherDense
from inhernet_jax.sizes import parameter_budget
from inhernet_jax.spec import InherSpec, LayerPlan

__all__ = [
    "InherConv",
    "InherDense",
    "InherSpec",
    "LayerPlan",
    "accounting",
    "allocate",
    "budget",
    "format_report",
    "inherit",
    "inherit_report",
    "layers",
    "parameter_budget",
    "planned_param_count",
    "resolve",
    "sizes",
    "svd",
]
__version__ = "0.1.0"


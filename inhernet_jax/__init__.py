"""InherNet in JAX: inherit a trained teacher instead of distilling a student.

Public API::

  import inhernet_jax as ij
  new_params = ij.inherit(teacher_params, 32, heads=3)
  spec = ij.InherSpec(rank=32, heads=3)
  model = MyModel(spec=spec)   # built from ij.layers.InherDense / InherConv
"""

from inhernet_jax import accounting, layers, svd
from inhernet_jax.inherit import (
    format_report,
    inherit,
    inherit_report,
    planned_param_count,
    resolve,
)
from inhernet_jax.layers import InherConv, InherDense
from inhernet_jax.spec import InherSpec, LayerPlan

__all__ = [
    "InherConv",
    "InherDense",
    "InherSpec",
    "LayerPlan",
    "accounting",
    "format_report",
    "inherit",
    "inherit_report",
    "layers",
    "planned_param_count",
    "resolve",
    "svd",
]
__version__ = "0.1.0"

# Budget-matched per-layer ranks (imports the model zoo, for "student:<model>" budgets).
from inhernet_jax import budget  # noqa: E402
from inhernet_jax.budget import allocate, parameter_budget  # noqa: E402

__all__ += ["allocate", "budget", "parameter_budget"]

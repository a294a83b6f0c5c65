"""InherNet in JAX: inherit a trained teacher instead of distilling a student.

The public API is flat; the code lives in subpackages by concern (`docs/design.md`):

| subpackage | owns | may import |
|---|---|---|
| `common` | path rules, atomic files, JSON, tree-path names | nothing of the package |
| `parallel` | meshes, shardings, `jax.distributed` start-up | `common` |
| `decomposition` | the method: SVD maths, `InherSpec`, the plan, its executors, `inherit`, budgets | `common`, `parallel` |
| `layers` | the inherited layers (linen) and their mixing and folding | `decomposition` |
| `surgery` | a user's own linen / NNX model inherited in one call (`inherit_model`, `nnx.inherit`) | `layers`, `calibration`, `decomposition`, `common` |
| `models` | the zoo (teacher and inherited network by one field), named sizes | `layers`, `decomposition` |
| `calibration` | running a model on calibration data: input Grams, BatchNorm statistics | `decomposition` |
| `data` | input pipelines and datasets | `common` |
| `training` | trainer, loop, optimisers, losses, checkpoints, integrity, lock | `layers`, `parallel`, `common` |
| `interop` | PyTorch / Hugging Face weights in, safetensors export out | `models`, `layers`, `decomposition`, `training`, `common` |
| `experiment` | teacher -> students -> InherNet runs, records, reports, figures | everything above |

Example:
    ```python
    import inhernet_jax as ij

    student, new_variables = ij.inherit_model(model, variables, 32, x)  # your own model
    new_params = ij.inherit(teacher_params, 32, heads=3)
    spec = ij.InherSpec(rank=32, heads=3)
    student = teacher.clone(spec=spec)   # a zoo model: teacher and inherited by one field
    ```
"""

from inhernet_jax import layers
from inhernet_jax.decomposition import accounting, budget, svd
from inhernet_jax.decomposition.budget import allocate
from inhernet_jax.decomposition.policy import LayerPlan
from inhernet_jax.decomposition.spec import InherSpec
from inhernet_jax.decomposition.transform import (
    format_report,
    inherit,
    inherit_report,
    planned_param_count,
    resolve,
)
from inhernet_jax.layers import InherConv, InherDense
from inhernet_jax.surgery import nnx  # inhernet_jax.nnx.inherit(model, spec): NNX surgery.
from inhernet_jax.surgery.linen import InheritedModel, inherit_model
from inhernet_jax.models import sizes
from inhernet_jax.models.sizes import parameter_budget

__all__ = [
    "InherConv",
    "InherDense",
    "InherSpec",
    "InheritedModel",
    "LayerPlan",
    "accounting",
    "allocate",
    "budget",
    "format_report",
    "inherit",
    "inherit_model",
    "inherit_report",
    "layers",
    "nnx",
    "parameter_budget",
    "planned_param_count",
    "resolve",
    "sizes",
    "svd",
]
__version__ = "0.1.0"

"""NNX entry points: ``inhernet_jax.nnx.inherit(model, spec)`` and the NNX layers.

Example:

    ```python
    import inhernet_jax as ij

    ij.nnx.inherit(model, ij.InherSpec(rank=8, heads=3))   # in place
    ```
"""

from inhernet_jax.layers.nnx import Experts, InherLayer
from inhernet_jax.surgery.nnx import inherit

__all__ = ["Experts", "InherLayer", "inherit"]

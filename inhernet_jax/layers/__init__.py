"""The inherited layers: one shared down-projection, H gated expert up-projections.

`InherDense` and `InherConv` (`linen`) read the same `InherSpec` as `inherit`, so a model
built with a spec has exactly the tree that `inherit` returns; `linen` also holds the
factorised computations (`factorised_dense`, `factorised_conv`, `gated_experts`) that
`inhernet_jax.surgery.linen` runs inside a user's own layers; `nnx` holds `InherLayer`,
the NNX inherited layer (`inhernet_jax.nnx.inherit` puts it into NNX models); `core` is the
maths both frameworks share (grouped inputs, gate summary, softmax and statistics);
`mixing` decides how the gated heads are mixed (in weight space or over outputs); `folding.fold`
multiplies inherited layers back into one kernel for serving where that is cheaper.

May import: `inhernet_jax.decomposition`.
"""

from inhernet_jax.layers.folding import fold
from inhernet_jax.layers.linen import InherConv, InherDense

__all__ = ["InherConv", "InherDense", "fold"]

"""Inheriting the models users wrote themselves, linen and NNX, without rewriting them.

* `linen`: `inherit_model(model, variables, spec[, x])` reads a linen model by tracing one
  abstract call (every `nn.Dense`, `nn.DenseGeneral`, `nn.Conv` and `nn.Einsum`: its
  path, its kernel's input and output axes, its scan/vmap stacking, its place in the
  call order), inherits the kernels as the model reads them, and returns the user's own
  model wrapped so that each inherited layer runs as its factorisation, at the same
  path (`nn.intercept_methods`);
* `static`: the same reading without a call (``inherit_model(model, variables, spec)``):
  each kernel's view from the params' shapes, Flax's automatic names and the layers
  ``setup`` defines; a kernel these leave open is an error asking for an example input;
* `nnx`: `inherit(model, spec)` replaces the layers of an `nnx.Module` graph in place
  (`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`, `nnx.Einsum`; `nnx.vmap` / `nnx.scan`
  stacks) by the NNX inherited layers of `inhernet_jax.layers.nnx`; `input_grams` records
  an NNX model's input Grams for data-aware inheritance;
* `common`: what both share: the canonical matrix view of a layer's kernel, the
  default keeps (the output layer; layers where factorising saves nothing) and the one
  `inherit` call that decomposes everything.

May import: `inhernet_jax.layers`, `inhernet_jax.calibration` (the conv im2col of NNX input
Grams), `inhernet_jax.decomposition`, `inhernet_jax.common`.
"""

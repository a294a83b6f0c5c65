"""inhernet_jax.decomposition.plan: the one count of a kernel before and after its layer plan."""

import jax
import numpy as np

from inhernet_jax.decomposition import policy
from inhernet_jax.decomposition.plan import Kernel
from inhernet_jax.decomposition.policy import LayerPlan


def _kernel(shape, stack=0, bias=True, plan=None):
  kernel = jax.ShapeDtypeStruct(shape, np.float32)  # Abstract: counting reads shapes only.
  b = jax.ShapeDtypeStruct(shape[:stack] + shape[-1:], np.float32) if bias else None
  return Kernel(keys=("l",), path="l/kernel", kernel=kernel, bias=b, stack=stack, plan=plan)


def test_a_kept_kernel_counts_as_its_teacher():
  k = _kernel((3, 3, 8, 16), plan=LayerPlan(False, 0, 2, 16, "kept"))
  assert k.layers == 1
  assert k.param_counts() == (3 * 3 * 8 * 16 + 16,) * 2
  assert _kernel((8, 16)).param_counts() == (8 * 16 + 16,) * 2  # Not planned yet.


def test_a_factorised_stack_counts_every_layer():
  k = _kernel((4, 2, 24, 10), stack=2, bias=False, plan=LayerPlan(True, 3, 2, 10))
  assert k.layers == 8
  before, after = k.param_counts()
  assert before == 8 * 24 * 10
  # down 24x3, two heads of 3x10 (no bias), a gate 3->2 with bias: per layer.
  assert after == 8 * (24 * 3 + 2 * 3 * 10 + 3 * 2 + 2)
  assert after == 8 * policy.inherited_params(24, 10, 3, 2, use_bias=False)

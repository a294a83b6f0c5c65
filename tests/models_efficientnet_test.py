"""Tests for `inhernet_jax.models.efficientnet` and how `inherit` and `InherConv` treat
its depthwise (grouped) convs. Shapes only (``jax.eval_shape``) except one tiny grouped
conv: nothing big is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inhernet_jax import InherSpec, inherit_report, models
from inhernet_jax import inherit
from inhernet_jax.layers.linen import InherConv
from inhernet_jax.models import efficientnet

SIZE = 32


def _shapes(tree):
  return jax.tree.map(lambda a: tuple(a.shape), tree)


def _abstract(model):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                        jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32))


def test_zoo_entry_has_lite0_parameter_count():
  assert models.family("efficientnet_lite0") == "imagenet"
  # 4,652,008: the tensors of the wheel's efficientnet-lite0-57934424.pth less BatchNorm
  # running statistics and step counters.
  assert models.param_count("efficientnet_lite0") == 4_652_008
  variables = _abstract(models.create("efficientnet_lite0", num_classes=10))
  assert set(variables) == {"params", "batch_stats"}
  assert len([k for k in variables["params"] if k.startswith("block_")]) == 16
  assert variables["params"]["block_1"]["depthwise"]["kernel"].shape == (3, 3, 1, 96)
  assert "expand" not in variables["params"]["block_0"]


@pytest.mark.parametrize("which", models.PRESETS)
def test_presets_keep_depthwise_and_trees_agree(which):
  teacher = models.create("efficientnet_lite0", num_classes=10)
  params = _abstract(teacher)["params"]
  spec = InherSpec(rank=0.25, heads=2, rules=models.preset(which, "efficientnet_lite0"))
  rng = np.random.default_rng(0)
  concrete = jax.tree.map(lambda a: rng.standard_normal(a.shape, dtype=np.float32), params)
  inherited, rows = inherit(concrete, spec, return_report=True)
  by_path = {r["path"]: r for r in rows}
  depthwise = [p for p in by_path if p.endswith("depthwise/kernel")]
  assert len(depthwise) == 16
  assert all(by_path[p]["action"] == "keep" and by_path[p]["reason"] for p in depthwise)
  assert by_path["block_5/expand/kernel"]["action"] == "factorize"
  student = _abstract(teacher.clone(spec=spec))
  assert _shapes(inherited) == _shapes(student["params"])


@pytest.mark.parametrize("heads", [1, 2])
def test_depthwise_conv_factorised_by_a_rule_agrees_with_inherit(heads):
  # Without the depthwise rule `inherit` sees a (3, 3, 1, 16) kernel as one 9 x 16 matrix;
  # the layer runs that plan: the student is exactly the rank-r truncation.
  conv = InherConv(16, (3, 3), feature_group_count=16, use_bias=False, name="dw")
  x = np.random.default_rng(1).standard_normal((2, 6, 6, 16)).astype(np.float32)
  kernel = np.random.default_rng(2).standard_normal((3, 3, 1, 16)).astype(np.float32)
  spec = InherSpec(rank=3, heads=heads)
  student = inherit({"kernel": kernel}, spec)
  assert set(student) == ({"down", "up", "gate"} if heads > 1 else {"down", "up"})
  u, s, vt = np.linalg.svd(kernel.reshape(9, 16), full_matrices=False)
  truncated = ((u[:, :3] * s[:3]) @ vt[:3]).reshape(3, 3, 1, 16)
  want = conv.apply({"params": {"kernel": truncated}}, x)
  got = conv.clone(spec=spec).apply({"params": student}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(want) - conv.apply({"params": {"kernel": kernel}}, x)).max() > 1e-2

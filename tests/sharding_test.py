"""Mesh building, path rules -> partition specs, state shardings, batch slots.

Rules are checked on `jax.sharding.AbstractMesh` (shapes only, no devices), so every
mesh shape is testable on one CPU; placing arrays runs on the real (1-device) mesh.
Multi-device training is in sharded_train_test.py (separate processes).
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from inhernet_jax.parallel import sharding

AXES = sharding.AXES


def mesh(data=1, fsdp=1, model=1):
  return jax.sharding.AbstractMesh((data, fsdp, model), AXES)


def test_make_mesh_fills_the_minus_one_axis():
  m = sharding.make_mesh({"fsdp": 1, "data": -1})
  assert dict(m.shape) == {"data": jax.device_count(), "fsdp": 1, "model": 1}
  assert dict(sharding.make_mesh([("model", 1)]).shape)["data"] == 1
  assert "1 devices" in sharding.describe(m) or "devices" in sharding.describe(m)


@pytest.mark.parametrize("axes,match", [
    ({"tensor": 2}, r"unknown axis name\(s\) \['tensor'\]"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"data": 0}, "'data' size must be a positive int or -1"),
    ({"data": 2}, r"need 2 devices, there are 1"),
    ({"data": -1, "model": 3}, r"not divisible by the fixed axes"),
])
def test_make_mesh_errors_name_the_axis(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(axes)


@pytest.mark.parametrize("rules,error,match", [
    ("nope", ValueError, "expected one of"),
    ([("(", "fsdp")], ValueError, r"sharding rules\[0\]: invalid regex"),
    ([(".*", "shard")], ValueError, "action must be 'replicate', 'fsdp' or a tuple"),
    ([(".*", ("fsdp", "tensor"))], ValueError, "unknown mesh axis 'tensor'"),
    ([(".*",)], TypeError, r"sharding rules\[0\] must be a \(regex, action\) pair"),
    ([(".*", 3)], TypeError, "action must be a str or a tuple"),
])
def test_bad_rules_are_rejected(rules, error, match):
  with pytest.raises(error, match=match):
    sharding.resolve_rules(rules)


def test_fsdp_shards_the_largest_divisible_dimension():
  m = mesh(data=2, fsdp=4)
  rules = sharding.resolve_rules(None)
  assert sharding.partition_spec(m, "a/kernel", (3, 3, 64, 128), rules) == P(None, None, None, "fsdp")
  assert sharding.partition_spec(m, "a/kernel", (512, 100), rules) == P("fsdp")
  assert sharding.partition_spec(m, "a/bias", (10,), rules) == P()  # 4 does not divide 10
  assert sharding.partition_spec(m, "step", (), rules) == P()
  assert sharding.partition_spec(mesh(data=8), "a/kernel", (64, 64), rules) == P()


def test_tuple_rules_align_to_trailing_dimensions_and_first_match_wins():
  m = mesh(data=2, fsdp=2, model=2)
  rules = sharding.resolve_rules("tensor_parallel")
  spec = lambda path, shape: sharding.partition_spec(m, path, shape, rules)  # noqa: E731
  assert spec("block_0/attn/query/kernel", (64, 64)) == P("fsdp", "model")
  # The same rule on a scan-stacked kernel: the layer axis stays whole.
  assert spec("blocks/attn/query/kernel", (12, 64, 64)) == P(None, "fsdp", "model")
  assert spec("blocks/attn/query/up/kernel", (12, 2, 8, 64)) == P(None, None, None, "model")
  assert spec("blocks/mlp/fc2/down/kernel", (12, 256, 8)) == P(None, "model", None)
  assert spec("blocks/mlp/fc2/gate/kernel", (12, 8, 2)) == P()
  assert spec("head/kernel", (64, 10)) == P("fsdp")  # The catch-all.
  # Axes of size 1 are dropped from the spec.
  assert sharding.partition_spec(mesh(data=8), "x/query/kernel", (64, 64), rules) == P(None, None)


@pytest.mark.parametrize("rule,shape,match", [
    ((r".*", ("model",)), (10,), r"x/kernel: shape \(10,\) cannot be sharded .* dimension 10 "
                                 r"is not divisible by mesh axes model \(size 4\)"),
    ((r".*", (None, "model", None)), (8, 8), r"x/kernel: sharding rule .* names 3 dimensions"),
    ((r".*", ("model", "model")), (8, 8), "uses mesh axis 'model' twice"),
])
def test_rules_that_do_not_fit_name_the_path(rule, shape, match):
  with pytest.raises(ValueError, match=match):
    sharding.partition_spec(mesh(data=2, model=4), "x/kernel", shape, sharding.resolve_rules([rule]))


def test_optimizer_state_follows_its_params():
  m = sharding.make_mesh()
  params = {"dense": {"kernel": np.zeros((4, 8), np.float32), "bias": np.zeros(8, np.float32)}}
  state = {"params": params, "opt": optax.adam(1e-3).init(params), "step": np.int32(0)}
  rules = [(r"dense/kernel", ("data", None)), (r".*", "replicate")]
  shardings = sharding.state_shardings(m, state, params, rules)
  assert shardings["opt"][0].mu["dense"]["kernel"].spec == shardings["params"]["dense"]["kernel"].spec
  assert shardings["opt"][0].count.spec == P() and shardings["step"].spec == P()


def test_put_places_host_arrays_and_keeps_values():
  m = sharding.make_mesh()
  tree = {"a": np.arange(6.0).reshape(2, 3), "b": jax.numpy.ones(4)}
  targets = sharding.tree_shardings(m, tree)
  placed = sharding.put(tree, targets)
  for k in tree:
    assert isinstance(placed[k], jax.Array)
    np.testing.assert_array_equal(np.asarray(placed[k]), np.asarray(tree[k]))
    assert placed[k].sharding.is_equivalent_to(targets[k], placed[k].ndim)
  assert isinstance(tree["a"], np.ndarray)  # Not mutated.


def test_batch_slot_and_shard_batch():
  m = sharding.make_mesh()
  n = jax.device_count()
  assert sharding.process_batch_slot(m, 4 * n) == (0, 1)
  batch = sharding.shard_batch(m, {"input": np.ones((4 * n, 3), np.float32)})
  assert batch["input"].shape == (4 * n, 3)
  assert batch["input"].sharding.spec == P(("data", "fsdp"), None)


def test_batch_not_divisible_by_data_parallel_devices():
  m = jax.sharding.AbstractMesh((2, 2, 1), AXES)
  with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 data-parallel"):
    sharding.process_batch_slot(m, 6)

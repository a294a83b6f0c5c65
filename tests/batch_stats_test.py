"""Tests for `inhernet_jax.calibration.batch_stats.recalibrate_batch_stats` (BatchNorm re-estimation).

The statistics are checked against two independent computations: a NumPy forward pass of
a small Dense/BatchNorm network in training mode (the pre-normalisation activations
themselves), and, for the zoo CNNs, Flax's own momentum update started from zero
statistics (``new = (1 - momentum) * batch statistic``).
"""

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

from inhernet_jax import models
from inhernet_jax.calibration import grams as calibration
from inhernet_jax.calibration.batch_stats import recalibrate_batch_stats
from inhernet_jax.decomposition.transform import inherit
from inhernet_jax.decomposition.spec import InherSpec

EPS = 1e-5


class Net(nn.Module):
  """Dense -> BN -> ReLU -> Dense -> BN: every statistic is easy to recompute.

  ``use_fast_variance=False``: the two-pass variance, so that float32 cancellation in
  ``E[x^2] - E[x]^2`` (Flax's default) does not blur the comparison with float64.
  """

  @nn.compact
  def __call__(self, x, train: bool = True):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, epsilon=EPS,
                                   use_fast_variance=False, name=name)
    h = nn.relu(bn("bn1")(nn.Dense(4, name="fc1")(x)))
    return bn("bn2")(nn.Dense(3, name="fc2")(h))


def _perturbed_vars(seed):
  """Net's variables with non-trivial BN scales, biases and stored statistics."""
  rng = np.random.default_rng(seed)
  v = Net().init(jax.random.key(seed), jnp.zeros((2, 5)), train=False)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) + (a.ndim == 1),
                                            jnp.float32), v)


def _reference(v, batches, unbiased):
  """Averages of per-batch statistics, from a float64 NumPy training-mode forward pass."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
  sums = {"bn1": [0, 0], "bn2": [0, 0]}
  for x in batches:
    h = np.asarray(x, np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    for name, nxt in (("bn1", "fc2"), ("bn2", None)):
      mean, var = h.mean(0), h.var(0)
      n = h.shape[0]
      sums[name][0] = sums[name][0] + mean
      sums[name][1] = sums[name][1] + (var * n / (n - 1) if unbiased else var)
      y = (h - mean) / np.sqrt(var + EPS) * p[name]["scale"] + p[name]["bias"]
      if nxt:
        h = np.maximum(y, 0) @ p[nxt]["kernel"] + p[nxt]["bias"]
  k = len(batches)
  return {name: {"mean": s[0] / k, "var": s[1] / k} for name, s in sums.items()}


@given(seed=st.integers(0, 2**16), count=st.integers(1, 3), size=st.sampled_from([3, 6]),
       unbiased=st.booleans(), scale=st.floats(0.1, 10.0))
@example(seed=1, count=1, size=3, unbiased=False, scale=0.25)  # Once off by 4e-4 (fast var).
def test_statistics_equal_those_of_the_pre_normalisation_activations(seed, count, size,
                                                                     unbiased, scale):
  v = _perturbed_vars(seed)
  rng = np.random.default_rng(seed + 1)
  batches = [np.float32(scale * rng.normal(size=(size, 5)) + rng.normal(size=5))
             for _ in range(count)]
  got = recalibrate_batch_stats(Net(), v, batches, unbiased=unbiased)
  want = _reference(v, batches, unbiased)
  for name in ("bn1", "bn2"):
    for stat in ("mean", "var"):
      np.testing.assert_allclose(got["batch_stats"][name][stat], want[name][stat],
                                 rtol=2e-4, atol=1e-5 * scale**2, err_msg=f"{name}/{stat}")
  np.testing.assert_array_equal(got["params"]["fc1"]["kernel"], v["params"]["fc1"]["kernel"])


def test_inputs_are_not_mutated_and_other_collections_kept():
  v = _perturbed_vars(0)
  before = jax.tree.map(np.array, v)
  v_plus = {**v, "extra": {"a": jnp.ones(2)}}
  out = recalibrate_batch_stats(Net(), v_plus, [np.ones((4, 5), np.float32)])
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, v), before)
  assert out is not v_plus and out["extra"] is v_plus["extra"]
  assert out["params"] is v["params"]
  assert not np.allclose(out["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])


def test_dict_and_tuple_batches_give_the_same_result():
  v = _perturbed_vars(3)
  x = [np.random.default_rng(k).normal(size=(4, 5)).astype(np.float32) for k in range(2)]
  a = recalibrate_batch_stats(Net(), v, x)
  b = recalibrate_batch_stats(Net(), v, ({"input": xi, "label": 0} for xi in x))
  c = recalibrate_batch_stats(Net(), v, [(xi,) for xi in x])
  for other in (b, c):
    jax.tree.map(np.testing.assert_array_equal, a["batch_stats"], other["batch_stats"])


@pytest.fixture(scope="module")
def resnet():
  teacher = models.create("resnet8", num_classes=3, num_filters=(4, 4, 8, 8))
  v = teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  return teacher, v


@pytest.mark.parametrize("inherited", [False, True])
def test_zoo_cnn_matches_flax_own_batch_statistics(resnet, inherited):
  """The biased estimate is the mean of what Flax's BatchNorm itself computes."""
  teacher, v = resnet
  model = teacher
  if inherited:
    spec = InherSpec(rank=2, heads=2)
    model = teacher.clone(spec=spec)
    v = dict(v, params=inherit(v["params"], spec))
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(4, 8, 8, 3)).astype(np.float32) for _ in range(3)]
  got = recalibrate_batch_stats(model, v, batches, unbiased=False)
  zeros = jax.tree.map(jnp.zeros_like, v["batch_stats"])
  each = []
  for x in batches:  # Flax's update from zero statistics: (1 - momentum) * batch stat.
    _, state = model.apply({**v, "batch_stats": zeros}, x, train=True, mutable=["batch_stats"])
    each.append(jax.tree.map(lambda s: np.asarray(s, np.float64) / (1 - 0.9),
                             state["batch_stats"]))
  want = jax.tree.map(lambda *s: np.mean(s, axis=0), *each)
  assert jax.tree.structure(got["batch_stats"]) == jax.tree.structure(want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               got["batch_stats"], want)
  # The unbiased estimate rescales each var by n / (n - 1), n = batch x positions.
  unbiased = recalibrate_batch_stats(model, v, batches)
  n = 4 * 8 * 8  # The stem's BatchNorm sees every input position.
  np.testing.assert_allclose(unbiased["batch_stats"]["bn_init"]["var"],
                             got["batch_stats"]["bn_init"]["var"] * n / (n - 1), rtol=1e-5)


def test_recalibrated_statistics_normalise_the_calibration_data(resnet):
  """In eval mode after re-estimation, the stem BN's output has mean ~0 and var ~1."""
  teacher, v = resnet
  x = np.random.default_rng(1).normal(2.0, 3.0, size=(16, 8, 8, 3)).astype(np.float32)
  out = recalibrate_batch_stats(teacher, v, [x])

  k = out["params"]["stem"]["kernel"]  # The stem conv (no bias), recomputed directly.
  h = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  stats = out["batch_stats"]["bn_init"]
  z = (np.asarray(h) - stats["mean"]) / np.sqrt(stats["var"])
  np.testing.assert_allclose(z.mean((0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(z.var((0, 1, 2)), 1, rtol=1e-2)


def test_model_without_batch_norm_is_returned_unchanged():
  model = models.create("mlp", num_classes=3, hidden=(4,))
  v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  out = recalibrate_batch_stats(model, v, [np.zeros((2, 8, 8, 1), np.float32)])
  assert out == dict(v) and out is not v


def test_eval_mode_is_a_clear_error():
  with pytest.raises(ValueError, match=r"bn1 ran with use_running_average=True.*training mode"):
    recalibrate_batch_stats(Net(), _perturbed_vars(0), [np.ones((4, 5), np.float32)],
                            apply_kwargs={"train": False})


def test_no_batches_is_an_error():
  with pytest.raises(ValueError, match="batches is empty"):
    recalibrate_batch_stats(Net(), _perturbed_vars(0), [])


def test_batch_stats_without_any_batch_norm_call_is_an_error():
  v = _perturbed_vars(0)
  model = models.create("mlp", num_classes=3, hidden=(4,))
  mv = dict(model.init(jax.random.key(0), jnp.zeros((1, 5))), batch_stats=v["batch_stats"])
  with pytest.raises(ValueError, match="no nn.BatchNorm ran"):
    recalibrate_batch_stats(model, mv, [np.ones((2, 5), np.float32)])


def test_training_gradients_do_not_depend_on_the_running_statistics(resnet):
  """Why re-estimation cannot change fine-tuning: in training mode BatchNorm normalises
  with batch statistics, so the loss and gradients are the same whatever the stored
  statistics; only evaluation sees them, until the momentum update forgets them."""
  teacher, v = resnet
  x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
  fresh = recalibrate_batch_stats(teacher, v, [x])

  def loss(params, stats):
    out, _ = teacher.apply({"params": params, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"])
    return jnp.sum(out**2)

  ga = jax.grad(loss)(v["params"], v["batch_stats"])
  gb = jax.grad(loss)(v["params"], fresh["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, ga, gb)


class _Bn(nn.Module):
  """One BatchNorm on the inputs (Flax's defaults: the one-pass fast variance)."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    return nn.BatchNorm(use_running_average=not train, name="bn")(x)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), mean=st.floats(-1e4, 1e4), spread=st.floats(0.01, 10.0),
       rows=st.sampled_from([8, 256]), count=st.integers(1, 2), unbiased=st.booleans())
@example(seed=0, mean=1e4, spread=1.0, rows=256, count=2, unbiased=True)  # One-pass: 18.4.
@example(seed=0, mean=1e3, spread=1.0, rows=256, count=2, unbiased=True)  # One-pass: 0.599.
def test_statistics_match_pytorch_momentum_none_for_large_means(seed, mean, spread, rows,
                                                                 count, unbiased):
  """Running statistics are PyTorch's ``momentum=None`` (cumulative) estimate for
  activations ``mean + spread * N(0, 1)`` with ``|mean|`` up to 1e4: within 1e-5
  relative of PyTorch's ``BatchNorm1d(momentum=None)`` run in float64 on the same float32
  inputs (the reference; PyTorch's own float32 run is not: it is up to 6e-6 off it at
  mean 1e4, spread 1, and 1.7e-2 at spread 0.01, docs/robustness.md), and within 1e-6 of
  that estimator written out in NumPy float64."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(seed)
  features = 6
  batches = [np.float32(mean + spread * rng.normal(size=(rows, features)))
             for _ in range(count)]
  v = _Bn().init(jax.random.key(0), jnp.zeros((2, features)), train=False)
  got = recalibrate_batch_stats(_Bn(), v, batches, unbiased=unbiased)["batch_stats"]["bn"]
  exact = [x.astype(np.float64) for x in batches]
  want_mean = np.mean([x.mean(0) for x in exact], 0)
  want_var = np.mean([x.var(0, ddof=1 if unbiased else 0) for x in exact], 0)
  np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-6, atol=1e-6 * spread)
  np.testing.assert_allclose(got["var"], want_var, rtol=1e-6, atol=0)
  bn = torch.nn.BatchNorm1d(features, momentum=None).double().train()
  with torch.no_grad():
    for x in exact:
      bn(torch.from_numpy(x))
  torch_var = bn.running_var.numpy()
  if not unbiased:
    torch_var = torch_var * (rows - 1) / rows
  np.testing.assert_allclose(got["mean"], bn.running_mean.numpy(), rtol=1e-5, atol=1e-5 * spread)
  np.testing.assert_allclose(got["var"], torch_var, rtol=1e-5, atol=0)

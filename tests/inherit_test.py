"""Tests for `inhernet_jax.inherit`: the teacher-params -> inherited-params transform.

Teachers are tiny Flax models built from `InherConv` / `InherDense` with ``spec=None``
(so they are plain `nn.Conv` / `nn.Dense`); the inherited model is the same class with a
spec. References (rank-r truncations, spectra) are computed in float64 numpy.
"""

import copy
import functools
from typing import Any

import chex
import flax.linen as nn
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hypothesis import strategies as st

import inhernet_jax as ij
from inhernet_jax import InherConv, InherDense, InherSpec


# ---------------------------------------------------------------------------- models
class CNN(nn.Module):
  """Kernel matrices 9x8 (conv1), 72x12 (conv2), 12x10 (head)."""

  spec: Any = None

  @nn.compact
  def __call__(self, x):
    x = InherConv(8, (3, 3), spec=self.spec, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=True, name="bn")(x)
    x = nn.relu(x)
    x = InherConv(12, (3, 3), strides=2, padding="VALID", spec=self.spec, name="conv2")(x)
    x = nn.relu(x)
    x = x.mean((-3, -2))
    return InherDense(10, spec=self.spec, name="head")(x)


class TokenMLP(nn.Module):
  """Kernel matrices 16x24 (fc1), 24x16 (fc2, no bias), 16x5 (out); per-token gates."""

  spec: Any = None

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(20, 16, name="embed")(tokens)
    x = InherDense(24, spec=self.spec, name="fc1")(x)
    x = nn.gelu(x)
    x = nn.LayerNorm(name="ln")(x)
    x = InherDense(16, use_bias=False, spec=self.spec, name="fc2")(x)
    return InherDense(5, spec=self.spec, name="out")(x)


class _Block(nn.Module):
  spec: Any = None
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(InherDense(12, use_bias=self.use_bias, spec=self.spec, name="fc")(x)), None


class Stacked(nn.Module):
  """Three scan-stacked Dense 12x12 layers: kernel (3, 12, 12), bias (3, 12)."""

  spec: Any = None
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    scan = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    x, _ = scan(spec=self.spec, use_bias=self.use_bias, name="layers")(x, None)
    return x


MODELS = {
    "cnn": (CNN, jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 1)), jnp.float32)),
    "mlp": (TokenMLP, jnp.asarray(np.random.default_rng(2).integers(0, 20, (2, 6)), jnp.int32)),
}


def _random_like(shapes, seed):
  """Random values (numpy, no init compile) in the layout of ``shapes``.

  Every leaf is random (init would leave biases / norms at 0 / 1, which hides bugs);
  kernels are scaled by 1/sqrt(fan-in) to keep activations O(1).
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    fan_in = int(np.prod(s.shape[:-1])) if "kernel" in name else 1
    if "var" in name:
      return jnp.asarray(rng.uniform(0.5, 2.0, s.shape), s.dtype)
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def teacher(name):
  """(params, other_collections) of a teacher with random non-trivial weights."""
  cls, x = MODELS[name]
  variables = _random_like(jax.eval_shape(cls().init, jax.random.key(0), x), seed=3)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  return params, rest


@functools.cache
def stacked_teacher(use_bias=True):
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 12)), jnp.float32)
  shapes = jax.eval_shape(Stacked(use_bias=use_bias).init, jax.random.key(0), x)["params"]
  return _random_like(shapes, seed=6), x


@functools.cache
def _jitted_apply(name, spec):
  cls, _ = MODELS[name]
  return jax.jit(cls(spec=spec).apply)


def apply(name, spec, params):
  """The model's output; one compile per (model, spec), reused across tests."""
  return _jitted_apply(name, spec)({"params": params, **teacher(name)[1]}, MODELS[name][1])


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(d):
  return traverse_util.unflatten_dict(d, sep="/")


def kernel_paths(params):
  return {p for p in flat(params) if p.endswith("/kernel") or p == "kernel"}


def non_kernel_leaves(params):
  """Leaves not owned by a layer with a kernel (norms, embeddings)."""
  layers = {p.rsplit("/", 1)[0] for p in kernel_paths(params)}
  return {p: v for p, v in flat(params).items() if p.rsplit("/", 1)[0] not in layers}


def size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def shapes(tree):
  return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


def truncate(kernel, rank, stack=0):
  """Best rank-``rank`` approximation of each stack slice of a kernel (numpy float64)."""
  k = np.asarray(kernel, np.float64)
  mat = k.reshape(*k.shape[:stack], -1, k.shape[-1])
  u, s, vt = np.linalg.svd(mat, full_matrices=False)
  approx = (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]
  return jnp.asarray(approx.reshape(k.shape), kernel.dtype)


def truncated_teacher(params, rows):
  """The teacher with every factorised kernel replaced by its rank-r truncation."""
  d = dict(flat(params))
  for row in rows:
    if row["action"] == "factorize":
      d[row["path"]] = truncate(d[row["path"]], row["rank"], row["stack"])
  return unflat(d)


def spectrum(kernel, stack=0):
  k = np.asarray(kernel, np.float64)
  return np.linalg.svd(k.reshape(*k.shape[:stack], -1, k.shape[-1]), compute_uv=False)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


# Specs exercised for structure and report checks. The skip rule names a layer of each
# model so that it never warns.
SPECS = {
    "rank2": InherSpec(rank=2),
    "fraction": InherSpec(rank=0.5),
    "h1": InherSpec(rank=3, heads=1),
    "h2": InherSpec(rank=3, heads=2),
    "h3": InherSpec(rank=3, heads=3),
    "h4": InherSpec(rank=3, heads=4, skip_if_no_saving=False),
    "skip-rule": InherSpec(rank=3, heads=2, rules=((r"(conv1|fc1)/kernel", "skip"), (r"(head|out)/kernel", {"rank": 2, "heads": 1}))),
    "param_ratio": InherSpec(param_ratio=0.6, heads=2),
    "energy": InherSpec(energy=0.6, heads=2),
}


def model_spec(name, spec):
  """What the model needs: data-dependent specs are resolved against the teacher."""
  return ij.resolve(teacher(name)[0], spec) if spec.energy is not None else spec


# ------------------------------------------------------------------------- structure
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("model", list(MODELS))
def test_structure_matches_model_init(model, spec_name):
  spec = SPECS[spec_name]
  params, _ = teacher(model)
  out, rows = ij.inherit(params, spec, return_report=True)
  cls, x = MODELS[model]
  expected = jax.eval_shape(cls(spec=model_spec(model, spec)).init, jax.random.key(0), x)["params"]
  assert jax.tree.structure(out) == jax.tree.structure(expected)
  assert shapes(out) == shapes(expected)
  # The spec is meaningful here: something is factorised.
  assert any(r["action"] == "factorize" for r in rows)
  if spec_name == "skip-rule":
    first = "conv1" if model == "cnn" else "fc1"
    assert set(out[first]) == set(params[first])


@pytest.mark.parametrize("spec_name", ["h3", "skip-rule", "param_ratio", "energy"])
@pytest.mark.parametrize("model", list(MODELS))
def test_report_counts_are_real_sizes(model, spec_name):
  params, _ = teacher(model)
  out, rows = ij.inherit(params, SPECS[spec_name], return_report=True)
  # Every kernel appears once, kept ones included.
  assert sorted(r["path"] for r in rows) == sorted(kernel_paths(params))
  extra = size(non_kernel_leaves(params))
  assert sum(r["params_after"] for r in rows) + extra == size(out)
  assert sum(r["params_before"] for r in rows) + extra == size(params)
  for r in rows:
    if r["action"] == "keep":
      assert r["params_after"] == r["params_before"] and r["reason"]
      assert r["energy"] == 1.0 and r["error"] == 0.0
    else:
      assert r["params_after"] < r["params_before"] or not SPECS[spec_name].skip_if_no_saving


def test_format_report_totals():
  params, _ = teacher("cnn")
  rows = ij.inherit_report(params, SPECS["h3"])
  text = ij.format_report(rows)
  before = sum(r["params_before"] for r in rows)
  after = sum(r["params_after"] for r in rows)
  assert f"{before} -> {after}" in text
  for r in rows:
    assert r["path"] in text


# ------------------------------------------------------------------------ exactness
@hypothesis.settings(max_examples=10)
@hypothesis.given(
    model=st.sampled_from(list(MODELS)),
    heads=st.integers(1, 4),
    rank=st.one_of(st.sampled_from([1, 2, 3, 5]), st.sampled_from([0.3, 0.6])),
    forced=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_inherited_model_computes_rank_r_truncation(model, heads, rank, forced, seed):
  params, _ = teacher(model)
  spec = InherSpec(rank=rank, heads=heads, skip_if_no_saving=not forced)
  out, rows = ij.inherit(params, spec, key=jax.random.key(seed), return_report=True)
  hypothesis.note(str([(r["path"], r["action"], r["rank"]) for r in rows]))
  reference = apply(model, None, truncated_teacher(params, rows))
  logits = apply(model, spec, out)
  scale = float(jnp.max(jnp.abs(reference)))
  chex.assert_trees_all_close(logits, reference, rtol=1e-4, atol=1e-5 * scale)
  if any(r["action"] == "factorize" for r in rows):
    # Not vacuous: the truncation is visibly different from the teacher.
    assert rel_err(reference, apply(model, None, params)) > 1e-5 or all(
        r["rank"] == r["full_rank"] for r in rows if r["action"] == "factorize"
    )


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("model", list(MODELS))
def test_full_rank_is_the_teacher(model, heads):
  params, _ = teacher(model)
  spec = InherSpec(rank=1.0, heads=heads, skip_if_no_saving=False)
  out, rows = ij.inherit(params, spec, return_report=True)
  assert all(r["action"] == "factorize" and r["rank"] == r["full_rank"] for r in rows)
  assert rel_err(apply(model, spec, out), apply(model, None, params)) <= 1e-5


def test_stacked_scan_model_computes_per_layer_truncation():
  params, x = stacked_teacher()
  spec = InherSpec(rank=3, heads=2)
  out, rows = ij.inherit(params, spec, return_report=True)
  (row,) = rows
  assert row["path"] == "layers/fc/kernel" and row["stack"] == 1 and row["action"] == "factorize"
  expected = jax.eval_shape(Stacked(spec=spec).init, jax.random.key(0), x)["params"]
  assert shapes(out) == shapes(expected)
  reference = Stacked().apply({"params": truncated_teacher(params, rows)}, x)
  chex.assert_trees_all_close(Stacked(spec=spec).apply({"params": out}, x), reference, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------- stacked kernels
def _sign_aligned(down, up, ref_down):
  """Flips rank columns of (down, up) to match ref_down's signs (SVD sign freedom)."""
  signs = np.sign(np.sum(np.asarray(down, np.float64) * np.asarray(ref_down, np.float64), axis=tuple(range(down.ndim - 1))))
  return np.asarray(down) * signs, np.asarray(up) * signs[:, None]


@pytest.mark.parametrize("use_bias", [True, False])
def test_stacked_kernels_decomposed_per_slice(use_bias):
  params, _ = stacked_teacher(use_bias)
  layer = params["layers"]["fc"]
  kernel = layer["kernel"]
  rules = () if use_bias else ((r"layers/fc/kernel", {"stack": 1}),)
  spec = InherSpec(rank=3, heads=2, rules=rules)
  out = ij.inherit(params, spec)["layers"]["fc"]
  chex.assert_shape(out["down"]["kernel"], (3, 12, 3))
  chex.assert_shape(out["up"]["kernel"], (3, 2, 3, 12))
  chex.assert_shape(out["gate"]["kernel"], (3, 3, 2))
  assert ("bias" in out["up"]) == use_bias
  for i in range(3):
    single_params = {"fc": {"kernel": kernel[i], **({"bias": layer["bias"][i]} if use_bias else {})}}
    single = ij.inherit(single_params, InherSpec(rank=3, heads=2))["fc"]
    down, up = _sign_aligned(out["down"]["kernel"][i], out["up"]["kernel"][i], single["down"]["kernel"])
    np.testing.assert_allclose(down, single["down"]["kernel"], atol=1e-5)
    np.testing.assert_allclose(up, single["up"]["kernel"], atol=1e-5)
    if use_bias:
      np.testing.assert_array_equal(out["up"]["bias"][i], single["up"]["bias"])
    # And each head's product is the slice's own rank-3 truncation.
    np.testing.assert_allclose(down @ up[1], truncate(kernel[i], 3), atol=1e-5)
  # Each slice has its own gate.
  gates = np.asarray(out["gate"]["kernel"])
  assert not np.allclose(gates[0], gates[1]) and not np.allclose(gates[1], gates[2])


def test_stacked_kernel_without_bias_or_rule_is_one_matrix():
  """Without a bias (or a 'stack' rule) nothing marks the leading axis as layers."""
  params, _ = stacked_teacher(use_bias=False)
  (row,) = ij.inherit_report(params, InherSpec(rank=3))
  assert row["stack"] == 0 and row["full_rank"] == 12
  (row,) = ij.inherit_report(params, InherSpec(rank=3, rules=((r"layers/fc/kernel", {"stack": 1}),)))
  assert row["stack"] == 1


# ------------------------------------------------------------------- pytree hygiene
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_in_equals_dtype_out(dtype):
  params, _ = teacher("cnn")
  cast = jax.tree.map(lambda a: a.astype(dtype), params)
  out = ij.inherit(cast, InherSpec(rank=2, heads=3))
  assert {jnp.dtype(a.dtype) for a in jax.tree.leaves(out)} == {jnp.dtype(dtype)}
  # Same numbers as the float32 inheritance, up to the dtype's precision.
  ref = ij.inherit(params, InherSpec(rank=2, heads=3))
  tol = 1e-6 if dtype == jnp.float32 else 3e-2
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), out), ref, atol=tol, rtol=tol)


def test_mixed_dtypes_follow_their_source_leaf():
  params, _ = teacher("cnn")
  mixed = {k: dict(v) for k, v in params.items()}
  mixed["conv2"]["kernel"] = mixed["conv2"]["kernel"].astype(jnp.bfloat16)
  out = ij.inherit(mixed, InherSpec(rank=2, heads=2))["conv2"]
  assert out["down"]["kernel"].dtype == jnp.bfloat16
  assert out["up"]["kernel"].dtype == jnp.bfloat16
  assert out["gate"]["kernel"].dtype == jnp.bfloat16
  assert out["up"]["bias"].dtype == jnp.float32


def test_jit_matches_eager():
  params, _ = teacher("cnn")
  spec = InherSpec(rank=2, heads=3, rules=((r"head/kernel", "skip"),))
  eager = ij.inherit(params, spec)
  jitted = jax.jit(functools.partial(ij.inherit, rank=spec))(params)
  assert jax.tree.structure(jitted) == jax.tree.structure(eager)
  # Equal up to the sign of each singular pair (eager and jit may use different SVD
  # routines): flip (down column, up row) pairs of the jitted tree to match eager.
  jitted = jax.tree.map(lambda a: a, jitted)
  for name, layer in jitted.items():
    if "down" in layer:
      down, up = _sign_aligned(layer["down"]["kernel"], layer["up"]["kernel"], eager[name]["down"]["kernel"])
      jitted[name] = {**layer, "down": {"kernel": down}, "up": {**layer["up"], "kernel": up}}
  # float32 SVDs by two routines agree to about eps32 * ||A|| / (singular-value gap): a
  # few 1e-6 on this CPU (1.6e-6 on conv2/up), so 1e-5 absolute; a wrong factor is O(1).
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)


def test_inputs_never_mutated():
  params, _ = teacher("mlp")
  np_params = jax.tree.map(np.array, params)  # Writeable numpy leaves.
  before = copy.deepcopy(np_params)
  ids = {p: id(v) for p, v in flat(np_params).items()}
  spec = InherSpec(rank=2, heads=2, rules=((r"out/kernel", "skip"),))
  out = ij.inherit(np_params, spec)
  ij.inherit_report(np_params, spec)
  ij.resolve(np_params, spec)
  assert jax.tree.structure(np_params) == jax.tree.structure(before)
  chex.assert_trees_all_equal(np_params, before)
  assert {p: id(v) for p, v in flat(np_params).items()} == ids
  assert set(out["fc1"]) == {"down", "up", "gate"}  # The output is a new tree.


def test_deterministic_and_key_changes_only_gates():
  params, _ = teacher("cnn")
  spec = InherSpec(rank=2, heads=3)
  chex.assert_trees_all_equal(ij.inherit(params, spec), ij.inherit(params, spec))
  a = flat(ij.inherit(params, spec, key=jax.random.key(1)))
  b = flat(ij.inherit(params, spec, key=jax.random.key(2)))
  assert a.keys() == b.keys()
  gate_kernels = [p for p in a if p.endswith("gate/kernel")]
  assert gate_kernels
  for p in a:
    if p in gate_kernels:
      assert not np.allclose(a[p], b[p]), p
    else:
      np.testing.assert_array_equal(a[p], b[p], err_msg=p)


def test_non_kernel_leaves_pass_through():
  for model, kept in (("cnn", "head"), ("mlp", "out")):
    params, _ = teacher(model)
    spec = InherSpec(rank=2, heads=2, rules=((rf"{kept}/kernel", "skip"),))
    out = flat(ij.inherit(params, spec))
    src = flat(params)
    for p in non_kernel_leaves(params):
      assert out[p] is src[p], p
    assert out[f"{kept}/kernel"] is src[f"{kept}/kernel"]
    assert out[f"{kept}/bias"] is src[f"{kept}/bias"]


# ---------------------------------------------------------------------- report math
@pytest.mark.parametrize("model", list(MODELS))
def test_report_energy_and_error_match_numpy(model):
  params, _ = teacher(model)
  spec = InherSpec(rank=3, heads=2, skip_if_no_saving=False)
  rows = ij.inherit_report(params, spec)
  src = flat(params)
  for r in rows:
    s = spectrum(src[r["path"]])
    total = np.sum(s**2)
    rank = r["rank"]
    assert r["action"] == "factorize" and rank == min(3, len(s)) and r["full_rank"] == len(s)
    np.testing.assert_allclose(r["energy"], np.sum(s[:rank] ** 2) / total, rtol=1e-5)
    error = np.sqrt(np.sum(s[rank:] ** 2))
    np.testing.assert_allclose(r["error"], error, rtol=1e-4, atol=1e-5 * np.sqrt(total))
    np.testing.assert_allclose(r["rel_error"], error / np.sqrt(total), rtol=1e-4, atol=1e-5)
    assert r["shape"] == tuple(src[r["path"]].shape)


def test_report_at_full_rank_has_no_error():
  params, _ = teacher("cnn")
  rows = ij.inherit_report(params, InherSpec(rank=1.0, skip_if_no_saving=False))
  for r in rows:
    assert r["energy"] == pytest.approx(1.0, abs=1e-6)
    assert r["rel_error"] <= 1e-5


@pytest.mark.parametrize("model", list(MODELS))
def test_resolve_energy_spec(model):
  params, _ = teacher(model)
  spec = InherSpec(energy=0.6, heads=2)
  resolved = ij.resolve(params, spec)
  assert resolved.energy is None and hash(resolved) is not None
  # Same decisions, same params: the resolved spec is a frozen copy of the energy one.
  chex.assert_trees_all_equal(ij.inherit(params, resolved), ij.inherit(params, spec))
  drop_reason = lambda rows: [{k: v for k, v in r.items() if k != "reason"} for r in rows]  # noqa: E731
  assert drop_reason(ij.inherit_report(params, resolved)) == drop_reason(ij.inherit_report(params, spec))
  # The chosen ranks are the smallest meeting the energy (or the layer is kept).
  src = flat(params)
  for r in ij.inherit_report(params, spec):
    s = spectrum(src[r["path"]])
    kept = np.cumsum(s**2) / np.sum(s**2)
    smallest = int(np.argmax(kept >= 0.6 - 1e-9)) + 1
    shape = src[r["path"]].shape
    m, n = int(np.prod(shape[:-1])), shape[-1]
    use_bias = r["path"].replace("/kernel", "/bias") in src
    ups = 2 * (smallest * n + (n if use_bias else 0))
    saves = smallest < len(s) and m * smallest + ups + 2 * smallest + 2 < m * n + (n if use_bias else 0)
    assert r["action"] == ("factorize" if saves else "keep"), (r, smallest)
    if saves:
      assert r["rank"] == smallest
  # An unresolved energy spec cannot build a model.
  cls, x = MODELS[model]
  with pytest.raises(ValueError, match="resolve"):
    jax.eval_shape(cls(spec=spec).init, jax.random.key(0), x)


def test_energy_spec_under_jit_asks_for_resolve():
  params, _ = teacher("cnn")
  with pytest.raises(ValueError, match="resolve"):
    jax.jit(functools.partial(ij.inherit, rank=InherSpec(energy=0.9)))(params)


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "rank, error",
    [(0, ValueError), (-2, ValueError), (float("nan"), ValueError), (True, TypeError), ("2", TypeError), (1.5, ValueError)],
)
def test_bad_rank(rank, error):
  params, _ = teacher("cnn")
  with pytest.raises(error, match="rank"):
    ij.inherit(params, rank)


def test_bad_heads():
  params, _ = teacher("cnn")
  with pytest.raises(ValueError, match="heads"):
    ij.inherit(params, 2, heads=0)
  with pytest.raises(ValueError, match="heads"):
    ij.inherit(params, InherSpec(rank=2), heads=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_kernel_names_path(bad, dtype):
  params, _ = teacher("cnn")
  d = flat(params)
  k = np.array(d["conv2/kernel"])
  k[1, 2, 3, 4] = bad
  d = {path: jnp.asarray(x, dtype) for path, x in d.items()}
  d["conv2/kernel"] = jnp.asarray(k, dtype)
  with pytest.raises(ValueError, match="conv2/kernel"):
    ij.inherit(unflat(d), 2)
  d["conv2/kernel"] = jnp.asarray(np.where(np.isfinite(k), k, 3e38), dtype)  # Huge, finite.
  ij.inherit(unflat(d), 2)


@pytest.mark.parametrize("shape", [(5,), (2, 2, 2, 2, 2, 3)])
def test_unsupported_kernel_rank_names_path(shape):
  params = {"blk": {"odd": {"kernel": jnp.ones(shape)}}, "fc": {"kernel": jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match="blk/odd/kernel"):
    ij.inherit(params, 2)
  # A skip rule is the documented way out.
  out = ij.inherit(params, 2, rules=((r"blk/odd/kernel", "skip"),))
  assert out["blk"]["odd"]["kernel"] is params["blk"]["odd"]["kernel"]


def test_integer_kernel_rejected():
  with pytest.raises(TypeError, match="fc/kernel"):
    ij.inherit({"fc": {"kernel": jnp.ones((4, 4), jnp.int32)}}, 2)


def test_invalid_regex():
  params, _ = teacher("cnn")
  with pytest.raises(ValueError, match=r"'conv\('"):
    ij.inherit(params, 2, rules=((r"conv(", "skip"),))


def test_rule_matching_nothing_warns():
  params, _ = teacher("cnn")
  with pytest.warns(UserWarning, match=r"rules\[0\].*matches no kernel"):
    ij.inherit(params, 2, rules=((r"decoder/.*", "skip"),))


@pytest.mark.parametrize("params", [[1.0, 2.0], np.ones((3, 3)), None, "params"])
def test_params_must_be_a_dict(params):
  with pytest.raises(TypeError, match="dict"):
    ij.inherit(params, 2)


@pytest.mark.parametrize(
    "params, path",
    [
        ({"fc": {"kernel": [[1.0, 2.0], [3.0, 4.0]]}}, "fc/kernel"),
        ({"fc": {"kernel": np.ones((4, 4), np.float32), "bias": 0.0}}, "fc/bias"),
        ({"bn": {"scale": None}}, "bn/scale"),
    ],
)
def test_non_array_leaves_name_path(params, path):
  with pytest.raises(TypeError, match=path):
    ij.inherit(params, 2)


def test_full_variables_dict_rejected():
  params, rest = teacher("cnn")
  with pytest.raises(TypeError, match="variables"):
    ij.inherit({"params": params, **rest}, 2)


# ------------------------------------------------------- one plan, every executor
def _separated(m, n, seed, stack=()):
  """Kernels whose top singular values are well separated (``0.8^i``): their factors
  are well defined, so two backends' factors can be compared entry by entry."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u = np.linalg.qr(rng.standard_normal((*stack, m, k)))[0]
  v = np.linalg.qr(rng.standard_normal((*stack, n, k)))[0]
  return ((u * 0.8 ** np.arange(k)) @ np.swapaxes(v, -1, -2)).astype(np.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_host_jit_and_in_jit_paths_give_the_same_factors():
  """Host NumPy (concrete CPU arrays) and a jitted program per group (inside
  `jax.jit`) draw the same start matrices and run the same math."""
  params = {
      "big": {"kernel": _separated(300, 160, 0), "bias": np.zeros(160, np.float32)},
      "stack": {"kernel": _separated(160, 256, 1, stack=(2,))},
      "conv": {"kernel": _separated(27, 8, 2).reshape(3, 3, 3, 8)},
  }
  spec = InherSpec(rank=6, heads=2, rules=((r"stack/kernel", {"stack": 1}),))
  key = jax.random.key(4)
  host = traverse_util.flatten_dict(ij.inherit(params, spec, key=key), sep="/")
  jitted = traverse_util.flatten_dict(
      jax.jit(lambda p: ij.inherit(p, spec, key=key))(jax.tree.map(jnp.asarray, params)), sep="/")
  for path, x in host.items():
    assert _rel(jitted[path], x) <= 1e-5, (path, _rel(jitted[path], x))
    if "/gate/" in path:
      np.testing.assert_array_equal(np.asarray(jitted[path]), np.asarray(x))
  # And the randomized method really ran on the big kernels.
  assert ij.inherit_report(params, spec)[0]["path"] == "big/kernel"
  from inhernet_jax.decomposition import svd

  assert svd.use_randomized(300, 160, 6) and svd.use_randomized(160, 256, 6)


def test_start_matrices_do_not_depend_on_batching():
  """A kernel's factors are the same whether it is decomposed alone or batched with
  another kernel of the same shape (its start matrices come from its own path)."""
  a, b = _separated(300, 160, 0), _separated(300, 160, 1)
  spec = InherSpec(rank=6, method="randomized")
  alone = ij.inherit({"a": {"kernel": a}}, spec)["a"]
  both = ij.inherit({"a": {"kernel": a}, "b": {"kernel": b}}, spec)["a"]
  chex.assert_trees_all_close(alone, both, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [1e-20, 1e20])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_tiny_and_huge_kernels_inherit_as_accurately(scale, method):
  params = {"big": {"kernel": _separated(300, 160, 0)}}
  scaled = {"big": {"kernel": (params["big"]["kernel"].astype(np.float64) * scale).astype(np.float32)}}
  spec = InherSpec(rank=6, method=method)
  ref = ij.inherit(params, spec)["big"]
  got = ij.inherit(scaled, spec)["big"]
  assert _rel(got["down"]["kernel"], ref["down"]["kernel"]) <= 1e-5
  assert _rel(np.asarray(got["up"]["kernel"], np.float64) / scale, ref["up"]["kernel"]) <= 1e-5
  (row,) = ij.inherit_report(scaled, spec)
  assert row["rel_error"] == pytest.approx(ij.inherit_report(params, spec)[0]["rel_error"], rel=1e-4)


def test_numerical_failure_names_the_layer(monkeypatch):
  from inhernet_jax.decomposition import svd

  def broken(a, rank, *args, **kwargs):
    u, s, v = svd.exact_svd(a, rank, xp=kwargs.get("xp", jnp))
    return u * np.nan, s, v

  monkeypatch.setattr(svd, "randomized_svd", broken)
  params = {"enc": {"big": {"kernel": _separated(300, 160, 0)}}}
  with pytest.raises(ValueError, match=r"enc/big/kernel.*non-finite"):
    ij.inherit(params, InherSpec(rank=6, method="randomized"))


def test_energy_policy_on_a_stack_meets_the_target_in_every_slice():
  """One slice needs full rank for 99% energy, the other factorises at rank 1: the
  stack is kept whole (a factorised stack would keep 22% of the first slice)."""
  flat = np.random.default_rng(0).standard_normal((12, 10)).astype(np.float32)
  rank1 = np.outer(np.arange(1, 13), np.arange(1, 11)).astype(np.float32)
  params = {"blocks": {"fc": {"kernel": np.stack([flat, rank1])}}}
  rules = ((r"blocks/.*", {"stack": 1}),)
  (row,) = ij.inherit_report(params, InherSpec(energy=0.99, rules=rules))
  assert row["action"] == "keep" and "stack slice 0" in row["reason"], row
  # Both slices low rank: the stack gets the largest rank any slice needs.
  two = np.zeros((12, 10))
  two[0, 0] = two[1, 1] = 1.0  # Two equal singular values: rank 2.
  params = {"blocks": {"fc": {"kernel": np.stack([two, rank1]).astype(np.float32)}}}
  (row,) = ij.inherit_report(params, InherSpec(energy=0.99, rules=rules))
  assert row["action"] == "factorize" and row["rank"] == 2, row


def test_dense_general_kernel_with_multi_axis_bias_names_the_path():
  params = {"attn": {"qkv": {"kernel": np.ones((8, 3, 4), np.float32), "bias": np.ones((3, 4), np.float32)}}}
  with pytest.raises(ValueError, match=r"attn/qkv/kernel.*bias of shape \(3, 4\).*skip"):
    ij.inherit(params, 2)

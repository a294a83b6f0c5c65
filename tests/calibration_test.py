"""Tests for `inhernet_jax.calibration.grams` and data-aware inheritance (`inherit(calibration=)`).

Teachers are tiny zoo models with random weights (numpy, no init compile). References
are independent float64 numpy: im2col by slicing, Grams from activations captured with
``capture_intermediates``, and the data-aware truncation through a symmetric square root
of the damped Gram (eigh) rather than the library's Cholesky.
"""

import functools
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import inhernet_jax as ij
from inhernet_jax import models
from inhernet_jax.calibration import grams as calibration
from inhernet_jax.calibration.grams import whitened_spectra
from inhernet_jax.layers.linen import InherConv
from inhernet_jax.decomposition.spec import InherSpec


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def unflat(d):
  return traverse_util.unflatten_dict(d, sep="/")


def random_like(shapes, seed):
  """Random leaves in the layout of ``shapes``; kernels scaled by 1/sqrt(fan-in)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    fan_in = int(np.prod(s.shape[:-1])) if "kernel" in jax.tree_util.keystr(path) else 1
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def cnn():
  """The digits CNN at widths (4, 8, 16): kernel matrices 9x4, 36x8 (stride 2), 128x16, 16x10."""
  model = models.create("cnn", widths=(4, 8, 16))
  x = np.random.default_rng(0).random((16, 8, 8, 1)).astype(np.float32)
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed=1)
  grams = calibration.input_grams(model, {"params": params}, [x[:8], x[8:]])
  return model, params, x, grams


@functools.cache
def gpt():
  """A 2-layer scan-stacked GPT: width 8, MLP 16, vocabulary 11; two batches of 2x6 tokens."""
  model = models.create("gpt2_small", num_classes=11, width=8, depth=2, num_heads=2, mlp_dim=16,
                        max_len=6, scan=True)
  tokens = np.random.default_rng(2).integers(0, 11, (2, 2, 6)).astype(np.int32)
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), tokens[0])["params"], seed=3)
  grams = calibration.input_grams(model, {"params": params}, list(tokens), apply_kwargs={"train": False})
  return model, params, tokens, grams


def np_patches(x, k, stride, pad):
  """im2col of NHWC ``x`` for a k x k conv: rows (n, oh, ow), columns (i, j, c)."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pad, pad, (0, 0)))
  oh, ow = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  cols = [x[:, i : i + stride * (oh - 1) + 1 : stride, j : j + stride * (ow - 1) + 1 : stride]
          for i in range(k) for j in range(k)]
  return np.stack(cols, axis=3).reshape(-1, k * k * x.shape[-1])


def np_truncation(kernel, entry, rank, damping=0.01):
  """The data-aware rank-r truncation of a kernel (one slice), in its own layout."""
  a = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  g = np.asarray(entry["gram"], np.float64) / entry["count"]
  g = g + damping * np.mean(np.diag(g)) * np.eye(len(g))
  w, q = np.linalg.eigh(g)
  u, s, vt = np.linalg.svd((q * np.sqrt(w)) @ q.T @ a)
  approx = (q / np.sqrt(w)) @ q.T @ (u[:, :rank] * s[:rank]) @ vt[:rank]
  return approx.reshape(kernel.shape)


def dense_case(stack=(), dead=()):
  """A Dense kernel 6x5 (stacked: one per slice) and Grams of 20 inputs; ``dead`` slices
  (``...``: all) have an input unit that is always zero."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((*stack, 20, 6))
  for i in dead:
    x[i][..., 2] = 0
  params = {"fc": {"kernel": rng.standard_normal((*stack, 6, 5)).astype(np.float32),
                   "bias": rng.standard_normal((*stack, 5)).astype(np.float32)}}
  gram = (np.swapaxes(x, -1, -2) @ x).astype(np.float32)
  return params, {"fc/kernel": {"gram": gram, "count": 20}}


# --------------------------------------------------------------------------- Grams
@pytest.mark.parametrize("padding", ["SAME", ((1, 0), (2, 1)), "CIRCULAR"])
def test_conv_patches_times_kernel_matrix_is_the_conv(padding):
  conv = InherConv(5, (3, 2), strides=(2, 1), padding=padding, kernel_dilation=(1, 2))
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 7, 6, 3)), jnp.float32)
  params = random_like(jax.eval_shape(conv.init, jax.random.key(0), x)["params"], seed=6)
  y = conv.apply({"params": params}, x)
  patches = calibration.conv_patches(conv, x)
  np.testing.assert_allclose(patches @ params["kernel"].reshape(-1, 5) + params["bias"],
                             y.reshape(-1, 5), atol=1e-5)


def test_dense_and_strided_conv_grams_are_x_transpose_x():
  model, params, x, grams = cnn()
  assert set(grams) == {"stem/kernel", "conv/kernel", "fc/kernel", "head/kernel"}
  _, state = model.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
  out = {k: np.asarray(v["__call__"][0], np.float64) for k, v in state["intermediates"].items()
         if k != "__call__"}
  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  inputs = {
      "stem/kernel": np_patches(x, 3, 1, (1, 1)),  # SAME, stride 1
      "conv/kernel": np_patches(relu(out["stem"]), 3, 2, (0, 1)),  # SAME, stride 2
      "fc/kernel": relu(out["conv"]).reshape(len(x), -1),
      "head/kernel": relu(out["fc"]),
  }
  for path, rows in inputs.items():
    entry = grams[path]
    assert entry["count"] == len(rows) and entry["gram"].dtype == jnp.float32, path
    np.testing.assert_allclose(entry["gram"], rows.T @ rows, rtol=1e-5, atol=1e-4, err_msg=path)


def test_scan_stacked_grams_match_each_layer():
  model, params, tokens, grams = gpt()
  assert grams["blocks/mlp/fc2/kernel"]["gram"].shape == (2, 16, 16)
  assert grams["head/kernel"]["gram"].shape == (8, 8)
  assert {e["count"] for e in grams.values()} == {tokens.size}
  # By hand, from the activations the scan captures (stacked along its layer axis too).
  capture = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True,
                                      mutable=["intermediates"]))
  rows = {}
  for batch in tokens:
    blocks = capture({"params": params}, batch)[1]["intermediates"]["blocks"]

    def out(*keys):
      return np.asarray(functools.reduce(dict.get, keys, blocks)["__call__"][0], np.float64)

    q, k, v = (out("attn", n).reshape(2, 2, 6, 2, 4) for n in ("query", "key", "value"))
    logits = np.einsum("lbqhd,lbkhd->lbhqk", q / 2.0, k) + np.where(np.tri(6), 0, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("lbhqk,lbkhd->lbqhd", weights, v).reshape(2, 2, 6, 8)
    for name, x in (("attn/query", out("norm1")), ("attn/out", attended), ("mlp/fc1", out("norm2")),
                    ("mlp/fc2", jax.nn.gelu(out("mlp", "fc1"), approximate=True))):
      rows.setdefault(name, []).append(np.asarray(x).reshape(2, -1, x.shape[-1]))
  for name, parts in rows.items():
    x = np.concatenate(parts, axis=1)
    np.testing.assert_allclose(grams[f"blocks/{name}/kernel"]["gram"], np.swapaxes(x, 1, 2) @ x,
                               rtol=1e-4, atol=1e-4, err_msg=name)


def test_output_error_trace_form_matches_activations():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 30, 18))
  kernel = rng.standard_normal((2, 3, 3, 2, 4))  # Two stacked 3x3 convs, 2 -> 4 channels.
  approx = kernel + 0.1 * rng.standard_normal(kernel.shape)
  gram = np.swapaxes(x, -1, -2) @ x
  err = calibration.output_error(kernel, approx, gram)
  a, b = kernel.reshape(2, 18, 4), approx.reshape(2, 18, 4)
  want = [np.linalg.norm(x[i] @ (a[i] - b[i])) / np.linalg.norm(x[i] @ a[i]) for i in range(2)]
  np.testing.assert_allclose(err, want, rtol=1e-10)
  assert isinstance(calibration.output_error(a[0], b[0], gram[0]), float)
  assert calibration.output_error(a[0], a[0], np.zeros((18, 18))) == 0.0
  with pytest.raises(ValueError, match=r"\(\*stack, m, m\)"):
    calibration.output_error(a[0], b[0], gram[0, :5, :5])


# --------------------------------------------------------------- data-aware inherit
def test_inherited_network_computes_the_data_aware_truncation():
  model, params, x, grams = cnn()
  rules = models.preset("default", "cnn")
  spec = InherSpec(rank=3, heads=2, data_aware=True, rules=rules)
  out, rows = ij.inherit(params, spec, calibration=grams, return_report=True)
  _, plain_rows = ij.inherit(params, spec.replace(data_aware=False), calibration=grams, return_report=True)
  reference = flat(params)
  for path in ("conv/kernel", "fc/kernel"):
    reference[path] = jnp.asarray(np_truncation(reference[path], grams[path], 3), jnp.float32)
  want = model.apply({"params": unflat(reference)}, x)
  chex.assert_trees_all_close(model.clone(spec=spec).apply({"params": out}, x), want, rtol=1e-4, atol=1e-4)
  # The report: flagged, honest weight error, output error on the calibration inputs.
  errors = calibration.inherited_output_errors(params, out, grams)
  assert set(errors) == {"conv/kernel", "fc/kernel"}
  for row, plain in zip(rows, plain_rows):
    path = row["path"]
    assert row["data_aware"] == (path in errors) and not plain["data_aware"]
    if path in errors:
      a = np.asarray(flat(params)[path], np.float64)
      weight = np.linalg.norm(a - np_truncation(a, grams[path], 3)) / np.linalg.norm(a)
      np.testing.assert_allclose(row["rel_error"], weight, rtol=1e-4)
      np.testing.assert_allclose(row["output_rel_error"], errors[path], rtol=1e-6)
      np.testing.assert_allclose(row["energy"], 1 - row["output_rel_error"] ** 2, atol=0.02)  # Damping.
      assert row["output_rel_error"] < plain["output_rel_error"] and not row["reason"]
  assert "(data-aware)" in ij.format_report(rows)
  # resolve keeps data_aware: same params, and the model builds the same tree.
  resolved = ij.resolve(params, spec)
  assert dict(resolved.rules[1][1])["data_aware"]
  chex.assert_trees_all_equal(ij.inherit(params, resolved, calibration=grams), out)
  shapes = jax.eval_shape(model.clone(spec=resolved).init, jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, out)


def test_full_rank_data_aware_is_the_teacher():
  model, params, x, grams = cnn()
  spec = InherSpec(rank=1.0, heads=2, data_aware=True, skip_if_no_saving=False)
  out, rows = ij.inherit(params, spec, calibration=grams, return_report=True)
  assert all(r["data_aware"] and r["rank"] == r["full_rank"] for r in rows)
  assert max(r["output_rel_error"] for r in rows) < 1e-5
  teacher = model.apply({"params": params}, x)
  chex.assert_trees_all_close(model.clone(spec=spec).apply({"params": out}, x), teacher, rtol=1e-4, atol=1e-4)


def _optimal_output_error(a, g, rank):
  """sqrt of min tr((A - B)^T G (A - B)) over rank-r B, float64: the tail of G^{1/2} A."""
  w, q = np.linalg.eigh(g)
  s = np.linalg.svd((q * np.sqrt(np.clip(w, 0, None))) @ q.T @ a, compute_uv=False)
  return np.sqrt(np.sum(s[rank:] ** 2))


def test_singular_gram_undamped_is_the_optimum_of_the_output_error():
  """A rank-deficient X (a dead input unit) without damping: the pseudo-inverse square
  root of the Gram (as SVD-LLM) gives the optimal truncation; no plain-SVD fallback."""
  params, grams = dense_case(dead=[...])
  spec = InherSpec(rank=2, data_aware=True, damping=0.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out, (row,) = ij.inherit(params, spec, calibration=grams, return_report=True)
  assert row["data_aware"] and not row["reason"]
  # Stacked: every slice, the dead one included, at the optimum.
  params, grams = dense_case(stack=(3,), dead=[1])
  out = ij.inherit(params, spec, calibration=grams)["fc"]
  approx = np.asarray(out["down"]["kernel"], np.float64) @ np.asarray(out["up"]["kernel"], np.float64)[:, 0]
  for i in range(3):
    a = np.asarray(params["fc"]["kernel"][i], np.float64)
    g = np.asarray(grams["fc/kernel"]["gram"][i], np.float64) / 20
    e = a - approx[i]
    got = np.sqrt(np.trace(e.T @ g @ e))
    assert got <= 1.001 * _optimal_output_error(a, g, 2), i


def test_missing_or_misshaped_gram_names_path_and_shape():
  params, grams = dense_case()
  spec = InherSpec(rank=2, data_aware=True)
  with pytest.raises(ValueError, match=r"fc/kernel.*\(6, 6\).*input_grams"):
    ij.inherit(params, spec)
  with pytest.raises(ValueError, match=r"fc/kernel.*\(5, 5\), expected shape \(6, 6\).*input_grams"):
    ij.inherit(params, spec, calibration={"fc/kernel": {"gram": np.eye(5), "count": 1}})
  with pytest.raises(ValueError, match=r"fc/kernel.*count"):
    ij.inherit(params, spec, calibration={"fc/kernel": {"gram": np.eye(6), "count": 0}})
  with pytest.raises(TypeError, match="calibration"):
    ij.inherit(params, spec, calibration=[grams])
  stacked, _ = dense_case(stack=(3,))
  with pytest.raises(ValueError, match=r"fc/kernel.*expected shape \(3, 6, 6\)"):
    ij.inherit(stacked, spec, calibration=grams)
  # Plain kernels need no Gram; a rule can turn data-aware off.
  ij.inherit(params, spec.replace(rules=((r"fc/kernel", {"data_aware": False}),)))


def test_sharded_path_equals_unsharded():
  # A stack with one dead slice (rank-deficient X, undamped): the same factors.
  params, grams = dense_case(stack=(2,), dead=[1])
  spec = InherSpec(rank=2, heads=2, data_aware=True, damping=0.0, skip_if_no_saving=False)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ref = ij.inherit(params, spec, calibration=grams)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = ij.inherit(params, spec, mesh=mesh, calibration=grams)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def test_jit_matches_host():
  params, grams = dense_case(stack=(2,), dead=[1])
  spec = InherSpec(rank=2, heads=2, data_aware=True, damping=0.0, skip_if_no_saving=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    host = ij.inherit(params, spec, calibration=grams)
  with warnings.catch_warnings():  # No fallback (pseudo-inverse whitening), no warning.
    warnings.simplefilter("error")
    jitted = jax.jit(lambda p, c: ij.inherit(p, spec, calibration=c))(params, grams)
    jax.effects_barrier()
  assert set(host["fc"]) == {"down", "up", "gate"}
  chex.assert_trees_all_close(jitted, host, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("host", [True, False], ids=["host", "jit"])
def test_whitened_spectra_whiten_as_the_truncation_does(host):
  """Undamped, on singular Grams (a dead input unit, fewer rows than features): the
  spectra are those of ``G^{1/2} A`` (no plain-SVD fallback, no warning), and their tail
  is the output error of the data-aware truncation `inherit` computes."""
  params, grams = dense_case(stack=(2,), dead=[1])
  grams = {"fc/kernel": {"gram": grams["fc/kernel"]["gram"] * np.array([1, 0.2], np.float32)[:, None, None],
                         "count": 20}}
  spec = InherSpec(rank=2, heads=1, data_aware=True, damping=0.0, skip_if_no_saving=False)
  if not host:
    params, grams = jax.tree.map(jnp.asarray, (params, grams))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    spectra = whitened_spectra(params, grams, spec)["fc/kernel"]
    out = ij.inherit(params, spec, calibration=grams)
  a = np.asarray(params["fc"]["kernel"], np.float64)
  g = np.asarray(grams["fc/kernel"]["gram"], np.float64) / 20
  approx = np.asarray(out["fc"]["down"]["kernel"], np.float64) @ np.asarray(out["fc"]["up"]["kernel"], np.float64)[:, 0]
  for i in range(2):
    w, q = np.linalg.eigh(g[i])
    root = (q * np.sqrt(np.maximum(w, 0))) @ q.T
    np.testing.assert_allclose(spectra[i], np.linalg.svd(root @ a[i], compute_uv=False), rtol=1e-4, atol=1e-6)
    error = np.trace((a[i] - approx[i]).T @ g[i] @ (a[i] - approx[i]))
    np.testing.assert_allclose(error, np.sum(spectra[i][2:] ** 2), rtol=1e-3)


def test_whitened_spectra():
  _, params, _, grams = cnn()
  spectra = whitened_spectra(params, grams, InherSpec(rank=1, rules=models.preset("default", "cnn")))
  assert set(spectra) == {"conv/kernel", "fc/kernel"}
  for path, s in spectra.items():
    a = np.asarray(flat(params)[path], np.float64)
    a = a.reshape(-1, a.shape[-1])
    g = np.asarray(grams[path]["gram"], np.float64) / grams[path]["count"]
    w, q = np.linalg.eigh(g + 0.01 * np.mean(np.diag(g)) * np.eye(len(g)))
    np.testing.assert_allclose(s, np.linalg.svd((q * np.sqrt(w)) @ q.T @ a, compute_uv=False), rtol=1e-4)
  _, params, _, grams = gpt()
  spectra = whitened_spectra(params, grams)
  assert spectra["blocks/mlp/fc1/kernel"].shape == (2, 8) and spectra["head/kernel"].shape == (8,)
  with pytest.raises(ValueError, match="blocks/attn/key/kernel"):
    whitened_spectra(params, {k: v for k, v in grams.items() if "key" not in k})

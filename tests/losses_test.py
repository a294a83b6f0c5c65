"""Tests for `inhernet_jax.training.losses` against NumPy/PyTorch references written from formulas."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from inhernet_jax.training import losses
from inhernet_jax.training.losses import HintConnector, cross_entropy, dkd, fitnet_hint, hint_loss, kd

# One logits shape for (almost) every test: eager JAX compiles each primitive once per
# shape, so shared shapes keep the file fast. Token tests use (2, 6) positions with 8
# unmasked, whose flattening is again (8, C).
C = 100
B = 8
TOKENS = np.array([[1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 1, 0]], bool)


def draw(seed, shape=(B,), classes=C, scale=3.0):
  """Random student logits, teacher logits and labels (float32 / int32)."""
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal((*shape, classes))).astype(np.float32)
  t = (scale * rng.standard_normal((*shape, classes))).astype(np.float32)
  y = rng.integers(0, classes, size=shape).astype(np.int32)
  return s, t, y


# --------------------------------------------------------------- numpy references
def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_ce(logits, labels, eps=0.0):
  """Per-position CE with PyTorch-style label smoothing."""
  logp = np_log_softmax(logits)
  onehot = np.eye(logits.shape[-1])[labels]
  target = (1 - eps) * onehot + eps / logits.shape[-1]
  return -(target * logp).sum(-1)


def np_dkd(s, t, y, alpha, beta, temperature):
  """mdistiller's ``dkd_loss`` transcribed in float64 (probabilities, cat_mask, log)."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  gt_mask = np.eye(s.shape[-1])[y]
  other_mask = 1.0 - gt_mask

  def cat_mask(p):
    return np.stack([(p * gt_mask).sum(-1), (p * other_mask).sum(-1)], -1)

  def kl_sum(log_q, p):  # F.kl_div(log_q, p, size_average=False)
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - log_q), 0.0))

  n = y.size
  ps, pt = cat_mask(np_softmax(s / temperature)), cat_mask(np_softmax(t / temperature))
  tckd = kl_sum(np.log(ps), pt) * temperature**2 / n
  pt2 = np_softmax(t / temperature - 1000.0 * gt_mask)
  log_ps2 = np_log_softmax(s / temperature - 1000.0 * gt_mask)
  nckd = kl_sum(log_ps2, pt2) * temperature**2 / n
  return alpha * tckd + beta * nckd


# --------------------------------------------------------------------- cross-entropy
def test_ce_matches_numpy():
  s, _, y = draw(0)
  np.testing.assert_allclose(cross_entropy(s, y), np_ce(s, y).mean(), rtol=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.4, 1.0])
def test_label_smoothing_matches_formula(eps):
  s, _, y = draw(1)
  got = cross_entropy(s, y, label_smoothing=eps)
  np.testing.assert_allclose(got, np_ce(s, y, eps).mean(), rtol=1e-6)
  assert not np.isclose(got, cross_entropy(s, y), rtol=1e-3)


def test_masked_mean_is_mean_over_unmasked_tokens():
  s, _, y = draw(2, shape=TOKENS.shape)
  mask = TOKENS
  s[~mask] = np.nan  # padded positions must not leak, even as NaN
  got = cross_entropy(s, y, mask=mask)
  np.testing.assert_allclose(got, np_ce(s[mask], y[mask]).mean(), rtol=1e-6)
  assert cross_entropy(s, y, mask=np.zeros_like(mask)) == 0.0


def test_bf16_logits_give_float32_loss():
  s, t, y = draw(3, scale=4.0)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  s32, t32 = np.asarray(s16, np.float32), np.asarray(t16, np.float32)  # same values
  for got, want in [
      (cross_entropy(s16, y), cross_entropy(s32, y)),
      (kd(s16, t16, y, alpha=0.3, temperature=7.0), kd(s32, t32, y, alpha=0.3, temperature=7.0)),
      (dkd(s16, t16, y), dkd(s32, t32, y)),
  ]:
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_shape_errors():
  s, t, y = draw(4)
  with pytest.raises(ValueError, match="labels"):
    cross_entropy(s, y[:-1])
  with pytest.raises(ValueError, match="mask"):
    cross_entropy(s, y, mask=np.ones((3,), bool))
  with pytest.raises(ValueError, match="teacher"):
    kd(s, t[:, :-1], y, alpha=0.5, temperature=2.0)


# ------------------------------------------------------------------------------- KD
def test_kd_alpha_one_is_ce():
  s, t, y = draw(5)
  np.testing.assert_allclose(kd(s, t, y, alpha=1.0, temperature=7.0), cross_entropy(s, y), rtol=1e-6)


def test_kd_identical_logits_have_zero_kl():
  s, _, y = draw(6, shape=TOKENS.shape)
  np.testing.assert_allclose(kd(s, s, y, alpha=0.0, temperature=7.0), 0.0, atol=1e-6)
  np.testing.assert_allclose(kd(s, s, y, alpha=0.3, temperature=7.0), 0.3 * cross_entropy(s, y), rtol=1e-6)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_no_gradient_reaches_the_teacher(name):
  s, t, y = draw(7)
  loss_fn = losses.make_loss(name, **({"alpha": 0.3, "temperature": 7.0} if name == "kd" else {}))
  g_s, g_t = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(s, t, y)
  assert np.all(g_t == 0)
  assert np.abs(g_s).max() > 1e-3


def test_kd_matches_pytorch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  s, t, y = draw(8, scale=5.0)
  T = 7.0
  ts, tt, ty = torch.from_numpy(s).double(), torch.from_numpy(t).double(), torch.from_numpy(y).long()
  want = 0.3 * F.cross_entropy(ts, ty) + 0.7 * T * T * F.kl_div(
      F.log_softmax(ts / T, dim=1), F.softmax(tt / T, dim=1), reduction="batchmean"
  )
  got = kd(s, t, y, alpha=0.3, temperature=T)
  np.testing.assert_allclose(got, want.item(), rtol=1e-5, atol=1e-5)


def test_kd_tokens_with_mask_equals_flattened():
  s, t, y = draw(9, shape=TOKENS.shape)
  mask = TOKENS
  got = kd(s, t, y, alpha=0.3, temperature=4.0, mask=mask)
  want = kd(s[mask], t[mask], y[mask], alpha=0.3, temperature=4.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ------------------------------------------------------------------------------ DKD
@pytest.mark.parametrize(
    "seed, alpha, beta, temperature, scale",
    [(10, 1.0, 8.0, 4.0, 3.0), (11, 0.5, 2.0, 1.0, 2.0), (12, 2.0, 6.0, 7.0, 8.0)],
)
def test_dkd_matches_mdistiller_formulas(seed, alpha, beta, temperature, scale):
  s, t, y = draw(seed, scale=scale)
  got = dkd(s, t, y, alpha=alpha, beta=beta, temperature=temperature)
  np.testing.assert_allclose(got, np_dkd(s, t, y, alpha, beta, temperature), rtol=1e-5, atol=1e-5)


def test_dkd_terms_separately():
  s, t, y = draw(13)
  np.testing.assert_allclose(dkd(s, t, y, alpha=1.0, beta=0.0), np_dkd(s, t, y, 1.0, 0.0, 4.0), rtol=1e-5)
  np.testing.assert_allclose(dkd(s, t, y, alpha=0.0, beta=1.0), np_dkd(s, t, y, 0.0, 1.0, 4.0), rtol=1e-5)


def test_dkd_zero_when_student_is_teacher_and_nonnegative():
  s, t, y = draw(14, shape=TOKENS.shape)
  np.testing.assert_allclose(dkd(s, s, y), 0.0, atol=1e-6)
  assert dkd(s, t, y) > 0
  for seed in range(15, 20):
    s, t, y = draw(seed, scale=6.0)
    assert dkd(s, t, y, alpha=1.0, beta=8.0) >= -1e-6


def test_dkd_stays_finite_when_target_saturates():
  s, t, y = draw(20)
  s[np.arange(B), y] += 200.0  # 1 - p_target underflows in float32
  got = dkd(s, t, y, temperature=1.0)
  assert np.isfinite(got)
  grad = jax.jit(jax.grad(losses.make_loss("dkd", temperature=1.0)))(s, t, y)
  assert np.all(np.isfinite(grad))


# --------------------------------------------------------------------------- FitNet
def test_hint_zero_when_projected_student_equals_teacher():
  feats = np.random.default_rng(21).standard_normal((2, 4, 4, 8)).astype(np.float32)
  assert hint_loss(feats, feats) == 0.0
  assert fitnet_hint(feats, feats) == 0.0
  np.testing.assert_allclose(hint_loss(feats, feats + 2.0), 4.0, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 4, 6), (2, 6), (2, 5, 6)])
def test_connector_shapes_and_params(shape):
  x = jnp.ones(shape)
  params = HintConnector(features=16).init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == {"proj": {"kernel": (6, 16), "bias": (16,)}}
  assert HintConnector(features=16).apply({"params": params}, x).shape == (*shape[:-1], 16)


def test_connector_on_nhwc_is_a_1x1_conv():
  rng = np.random.default_rng(22)
  x = rng.standard_normal((2, 3, 3, 6)).astype(np.float32)
  params = HintConnector(features=4).init(jax.random.key(1), x)["params"]
  kernel, bias = params["proj"]["kernel"], params["proj"]["bias"]
  want = jax.lax.conv_general_dilated(x, kernel[None, None], (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
  np.testing.assert_allclose(HintConnector(features=4).apply({"params": params}, x), want, rtol=1e-5, atol=1e-6)


def test_gradient_flows_to_connector_not_teacher():
  rng = np.random.default_rng(23)
  s = rng.standard_normal((2, 4, 4, 6)).astype(np.float32)
  t = rng.standard_normal((2, 4, 4, 12)).astype(np.float32)
  params = HintConnector(features=12).init(jax.random.key(2), s)["params"]
  g_params, g_t = jax.jit(jax.grad(fitnet_hint, argnums=(2, 1)))(s, t, params)
  assert float(jnp.abs(g_params["proj"]["kernel"]).max()) > 1e-3
  assert float(jnp.abs(g_params["proj"]["bias"]).max()) > 1e-3
  assert np.all(g_t == 0)
  # The variables-dict form is the same loss.
  np.testing.assert_allclose(fitnet_hint(s, t, {"params": params}), fitnet_hint(s, t, params))
  with pytest.raises(ValueError, match="HintConnector"):
    fitnet_hint(s, t)


# ------------------------------------------------------------------------ make_loss
CONFIGS = {
    "ce": {"label_smoothing": 0.1},
    "kd": {"alpha": 0.3, "temperature": 7.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0},
}


def test_configs_cover_every_loss():
  assert set(CONFIGS) == set(losses.LOSSES)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_loss_jits_with_uniform_signature(name):
  s, t, y = draw(24, shape=TOKENS.shape)
  mask = TOKENS
  loss_fn = losses.make_loss(name, **CONFIGS[name])
  direct = losses.LOSSES[name]
  args = (s, y) if name == "ce" else (s, t, y)
  want = direct(*args, mask=mask, **CONFIGS[name])
  got = jax.jit(loss_fn)(s, None if name == "ce" else t, y, mask)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(loss_fn)(s, t, y), direct(*args, **CONFIGS[name]), rtol=1e-6)


def test_make_loss_errors():
  with pytest.raises(ValueError, match=r"'kl'.*\['ce', 'dkd', 'kd'\]"):
    losses.make_loss("kl")
  s, _, y = draw(25)
  for name in ("kd", "dkd"):
    with pytest.raises(ValueError, match="teacher_logits"):
      losses.make_loss(name, **CONFIGS[name])(s, None, y)
  with pytest.raises(TypeError, match="temperature"):
    losses.make_loss("ce", temperature=4.0)
  with pytest.raises(TypeError, match="alpha"):
    losses.make_loss("kd", temperature=4.0)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("kd", {"alpha": 1.5, "temperature": 4.0}, r"alpha must be in \[0, 1\]"),
        ("kd", {"alpha": -0.1, "temperature": 4.0}, r"alpha must be in \[0, 1\]"),
        ("kd", {"alpha": 0.3, "temperature": 0.0}, "temperature must be > 0"),
        ("kd", {"alpha": 0.3, "temperature": -1.0}, "temperature must be > 0"),
        ("kd", {"alpha": float("nan"), "temperature": 4.0}, "alpha must be finite"),
        ("dkd", {"temperature": 0.0}, "temperature must be > 0"),
        ("dkd", {"beta": -1.0}, "beta must be >= 0"),
        ("ce", {"label_smoothing": 1.2}, r"label_smoothing must be in \[0, 1\]"),
    ],
)
def test_option_validation(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    losses.make_loss(name, **kwargs)
  s, t, y = draw(26)
  with pytest.raises(ValueError, match=match):  # direct calls validate too
    losses.LOSSES[name](*((s, y) if name == "ce" else (s, t, y)), **kwargs)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.floats(0.0, 1.0),
    temperature=st.floats(0.5, 20.0),
    scale=st.floats(0.1, 30.0),
)
def test_kd_is_at_least_alpha_ce(seed, alpha, temperature, scale):
  s, t, y = draw(seed, scale=scale)
  ce = float(cross_entropy(s, y))
  loss = float(kd(s, t, y, alpha=alpha, temperature=temperature))
  assert loss >= alpha * ce - 1e-5 * max(1.0, ce)
  assert float(dkd(s, t, y, temperature=temperature)) >= -1e-5

"""Tests for `inhernet_jax.training.optim`: schedules, PyTorch-semantics SGD, decay masks, errors.

The SGD reference is PyTorch's documented ``torch.optim.SGD`` update, written in NumPy
(dampening 0)::

  d = g + wd * p;  buf = d (first step) else momentum * buf + d
  d = d + momentum * buf if nesterov else buf;  p = p - lr * d
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from inhernet_jax import InherSpec, models
from inhernet_jax.training.optim import decay_mask, make_optimizer, make_schedule

SPE = 10  # steps per epoch


def config(**fields):
  return ml_collections.ConfigDict(fields)


def values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def tiny_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "fc": {"kernel": rng.standard_normal((3, 4)), "bias": rng.standard_normal(4)},
      "norm": {"scale": 1 + rng.standard_normal(4)},
  }


def as_jax(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def run(tx, params, grads_seq, jit=True):
  """Applies ``tx`` to a sequence of gradients (independent of the params)."""
  params = as_jax(params)
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for grads in grads_seq:
    params, state = step(params, state, as_jax(grads))
  return jax.tree.map(np.asarray, params)


# ------------------------------------------------------------------------- schedules
def test_step_schedule_decays_exactly_at_epoch_boundaries():
  sched = make_schedule(
      config(learning_rate=0.05, schedule="step", decay_epochs=(2, 4)),
      steps_per_epoch=SPE, total_steps=6 * SPE,
  )
  steps = [0, 19, 20, 21, 39, 40, 59, 1000]
  want = 0.05 * np.array([1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
  np.testing.assert_allclose(values(sched, steps), want, rtol=1e-6)


def test_step_schedule_paper_recipe():
  """lr x0.1 at epochs 150/180/210 (MultiStepLR stepped once per epoch)."""
  spe = 3
  sched = make_schedule(
      config(learning_rate=0.05, schedule="step", decay_epochs=[150, 180, 210], decay_factor=0.1),
      steps_per_epoch=spe, total_steps=240 * spe,
  )
  for epoch in (0, 149, 150, 179, 180, 209, 210, 239):
    want = 0.05 * 0.1 ** sum(epoch >= e for e in (150, 180, 210))
    got = values(sched, [epoch * spe, epoch * spe + spe - 1])
    np.testing.assert_allclose(got, [want, want], rtol=1e-5, err_msg=f"epoch {epoch}")


def test_cosine_schedule_warmup_peak_and_end():
  peak, total = 0.1, 5 * SPE
  sched = make_schedule(
      config(learning_rate=peak, schedule="cosine", warmup_epochs=1, end_lr_factor=0.1),
      steps_per_epoch=SPE, total_steps=total,
  )
  end = 0.1 * peak
  mid = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * 0.5))  # halfway through decay
  steps = [0, SPE // 2, SPE, SPE + (total - SPE) // 2, total, total + 7]
  want = [0.0, peak / 2, peak, mid, end, end]
  np.testing.assert_allclose(values(sched, steps), want, rtol=1e-5, atol=1e-9)
  # Monotone decay after the peak.
  assert np.all(np.diff(values(sched, range(SPE, total + 1))) <= 1e-9)


def test_cosine_without_warmup_starts_at_peak_and_warmup_steps_field():
  cosine = config(learning_rate=1.0, schedule="cosine")
  sched = make_schedule(cosine, steps_per_epoch=SPE, total_steps=20)
  np.testing.assert_allclose(values(sched, [0, 10, 20]), [1.0, 0.5, 0.0], atol=1e-6)
  sched = make_schedule(
      config(learning_rate=1.0, schedule="cosine", warmup_steps=4),
      steps_per_epoch=SPE, total_steps=20,
  )
  np.testing.assert_allclose(values(sched, [0, 1, 4, 12, 20]), [0, 0.25, 1, 0.5, 0], atol=1e-6)


def test_constant_and_warmup_constant():
  sched = make_schedule(config(learning_rate=0.3), steps_per_epoch=SPE, total_steps=50)
  np.testing.assert_allclose(values(sched, [0, 49, 50]), [0.3] * 3, rtol=1e-6)
  sched = make_schedule(
      config(learning_rate=0.3, schedule="warmup_constant", warmup_epochs=0.5),
      steps_per_epoch=SPE, total_steps=50,
  )
  np.testing.assert_allclose(values(sched, [0, 1, 5, 6, 50]), [0, 0.06, 0.3, 0.3, 0.3], rtol=1e-5)
  sched = make_schedule(
      config(learning_rate=0.3, schedule="warmup_constant"), steps_per_epoch=SPE, total_steps=50
  )
  np.testing.assert_allclose(values(sched, [0, 9]), [0.3, 0.3], rtol=1e-6)


def test_make_optimizer_returns_the_schedule_and_accepts_a_dict():
  fields = dict(name="sgd", learning_rate=0.05, schedule="step", decay_epochs=(1,))
  for cfg in (config(**fields), fields):
    _, sched = make_optimizer(cfg, steps_per_epoch=SPE, total_steps=20)
    np.testing.assert_allclose(values(sched, [9, 10]), [0.05, 0.005], rtol=1e-6)


# -------------------------------------------------------------------------------- SGD
def torch_sgd_reference(params, grads_seq, lrs, momentum, weight_decay, nesterov, mask):
  """PyTorch's SGD (dampening 0) in float64, decay only where ``mask`` is True."""
  p = jax.tree.map(lambda a: np.array(a, np.float64), params)
  flat_p, treedef = jax.tree.flatten(p)
  flat_m = treedef.flatten_up_to(mask)
  bufs = [None] * len(flat_p)
  for t, grads in enumerate(grads_seq):
    flat_g = treedef.flatten_up_to(grads)
    for i, (g, m) in enumerate(zip(flat_g, flat_m)):
      d = g + (weight_decay * flat_p[i] if m else 0.0)
      if momentum:
        bufs[i] = d if bufs[i] is None else momentum * bufs[i] + d
        d = d + momentum * bufs[i] if nesterov else bufs[i]
      flat_p[i] = flat_p[i] - lrs[t] * d
  return treedef.unflatten(flat_p)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("which", ["all", "kernels"])
def test_sgd_matches_pytorch_coupled_weight_decay(nesterov, which):
  params = tiny_params()
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda a: rng.standard_normal(a.shape), params) for _ in range(5)]
  cfg = config(
      name="sgd", learning_rate=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1,
      weight_decay_mask=which, schedule="step", decay_epochs=(1,),
  )
  tx, sched = make_optimizer(cfg, steps_per_epoch=3, total_steps=5)  # lr drops at step 3
  lrs = [0.05, 0.05, 0.05, 0.005, 0.005]
  np.testing.assert_allclose(values(sched, range(5)), lrs, rtol=1e-6)
  mask = decay_mask(params, which)
  want = torch_sgd_reference(params, grads_seq, lrs, 0.9, 0.1, nesterov, mask)
  got = run(tx, params, grads_seq)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=str(path))
  # Control: decoupled decay (after momentum) gives a different trajectory.
  decoupled = optax.chain(optax.sgd(sched, 0.9, nesterov), optax.add_decayed_weights(-0.05 * 0.1))
  other = run(decoupled, params, grads_seq)
  assert not np.allclose(other["fc"]["kernel"], want["fc"]["kernel"], rtol=1e-4)


def test_sgd_without_momentum_or_decay_is_plain_gradient_descent():
  params = tiny_params()
  grads = jax.tree.map(np.ones_like, params)
  cfg = config(name="sgd", learning_rate=0.5, momentum=0.0)
  tx, _ = make_optimizer(cfg, steps_per_epoch=1, total_steps=1)
  got = run(tx, params, [grads, grads], jit=False)
  for g, p in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_allclose(g, p - 1.0, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ decay masks / adam
@pytest.mark.parametrize(
    "which, decayed",
    [
        ("kernels", {"fc/kernel"}),
        ("all", {"fc/kernel", "fc/bias", "norm/scale"}),
        (".*(bias|scale)", {"fc/bias", "norm/scale"}),
        ("fc/.*", {"fc/kernel", "fc/bias"}),
    ],
)
def test_adamw_decays_only_masked_leaves(which, decayed):
  """Zero gradients: Adam's step is 0, so the update is -lr * wd * p exactly where masked."""
  params = as_jax(tiny_params())
  lr, wd = 0.1, 0.5
  tx, _ = make_optimizer(
      config(name="adamw", learning_rate=lr, weight_decay=wd, weight_decay_mask=which),
      steps_per_epoch=1, total_steps=1,
  )
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = "/".join(k.key for k in path)
    p = params
    for k in path:
      p = p[k.key]
    want = -lr * wd * np.asarray(p) if name in decayed else np.zeros(p.shape)
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-8, err_msg=name)


def test_adam_weight_decay_is_coupled():
  """torch.optim.Adam's weight_decay is an L2 gradient term: with zero gradients the first
  Adam step normalises it to -lr * sign(p) (AdamW would give -lr * wd * p)."""
  params = as_jax(tiny_params())
  tx, _ = make_optimizer(
      config(name="adam", learning_rate=0.1, weight_decay=0.5), steps_per_epoch=1, total_steps=1
  )
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  want = -0.1 * np.sign(params["fc"]["kernel"])
  np.testing.assert_allclose(updates["fc"]["kernel"], want, rtol=1e-5)
  np.testing.assert_array_equal(updates["fc"]["bias"], 0.0)


def test_adam_defaults_are_optax_defaults():
  params = as_jax(tiny_params())
  rng = np.random.default_rng(3)
  grads_seq = [jax.tree.map(lambda a: rng.standard_normal(a.shape), params) for _ in range(3)]
  tx, _ = make_optimizer(config(name="adam", learning_rate=1e-3), steps_per_epoch=1, total_steps=3)
  got, want = run(tx, params, grads_seq), run(optax.adam(1e-3), params, grads_seq)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6)


def test_kernels_mask_on_factorised_cnn():
  spec = InherSpec(rank=2, heads=3, skip_if_no_saving=False)
  model = models.create("cnn", num_classes=10, widths=(4, 8, 8), spec=spec)
  params = models.variable_shapes(model, "cnn")["params"]
  flat = {
      "/".join(k.key for k in path): m
      for path, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))
  }
  assert flat["stem/down/kernel"] and flat["stem/up/kernel"] and flat["stem/gate/kernel"]
  assert flat["fc/down/kernel"] and flat["fc/up/kernel"] and flat["fc/gate/kernel"]
  assert not flat["stem/up/bias"] and not flat["stem/gate/bias"] and not flat["fc/up/bias"]
  assert {k for k, m in flat.items() if m} == {k for k in flat if k.endswith("kernel")}
  assert len(flat) > 10


def test_kernels_mask_on_scanned_transformer():
  """nn.scan adds a layer axis: biases and LayerNorm scales are (depth, n), still no decay."""
  model = models.create(
      "gpt2_small", num_classes=32, width=16, depth=2, num_heads=2, mlp_dim=32, max_len=16,
      scan=True, spec=InherSpec(rank=4, heads=2, skip_if_no_saving=False),
  )
  params = models.variable_shapes(model, "gpt2_small")["params"]
  flat = {
      "/".join(k.key for k in path): m
      for path, m in jax.tree_util.tree_leaves_with_path(decay_mask(params))
  }
  assert flat["embed/embedding"] and flat["pos_embed"] and flat["blocks/mlp/fc1/gate/kernel"]
  assert not flat["blocks/norm1/scale"] and not flat["blocks/norm1/bias"]
  assert not flat["blocks/attn/query/up/bias"] and not flat["norm/scale"]
  decayed = {k for k, m in flat.items() if m}
  assert decayed == {k for k in flat if k.endswith(("kernel", "embedding", "pos_embed"))}


# -------------------------------------------------------------------------- clipping
def test_grad_clip_bounds_the_update_norm():
  params = as_jax(tiny_params())
  big = jax.tree.map(lambda a: 100.0 * jnp.ones_like(a), params)

  def update_norm(**extra):
    tx, _ = make_optimizer(
        config(name="sgd", learning_rate=1.0, momentum=0.0, **extra),
        steps_per_epoch=1, total_steps=1,
    )
    updates, _ = tx.update(big, tx.init(params), params)
    return float(optax.tree.norm(updates)), updates

  norm, updates = update_norm(grad_clip_norm=2.0)
  np.testing.assert_allclose(norm, 2.0, rtol=1e-5)
  # Clipping rescales, it does not change the direction.
  np.testing.assert_allclose(updates["fc"]["kernel"], updates["norm"]["scale"][0], rtol=1e-6)
  assert update_norm()[0] > 100  # Control: no clipping by default.
  assert update_norm(grad_clip_norm=0)[0] > 100


# ---------------------------------------------------------------------------- errors
BASE = dict(name="sgd", learning_rate=0.1)


@pytest.mark.parametrize(
    "fields, error, match",
    [
        (dict(name="rmsprop"), ValueError, "unknown name 'rmsprop'"),
        (dict(name=None), ValueError, "name is required"),
        (dict(learning_rate=None), ValueError, "learning_rate is required"),
        (dict(learning_rate=-0.1), ValueError, "learning_rate"),
        (dict(learning_rate="0.1"), TypeError, "learning_rate"),
        (dict(learning_rate=float("nan")), ValueError, "learning_rate must be finite"),
        (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
        (dict(weight_decay_mask="biases("), ValueError, "weight_decay_mask"),
        (dict(weight_decay_mask=["kernel"]), TypeError, "weight_decay_mask"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(momentum=0.0, nesterov=True), ValueError, "nesterov"),
        (dict(nesterov="yes"), TypeError, "nesterov"),
        (dict(name="adam", b2=1.0), ValueError, "b2"),
        (dict(name="adamw", eps=0.0), ValueError, "eps"),
        (dict(grad_clip_norm=-1.0), ValueError, "grad_clip_norm"),
        (dict(schedule="linear"), ValueError, "unknown schedule 'linear'"),
        (dict(schedule="step"), ValueError, "decay_epochs is required"),
        (dict(schedule="step", decay_epochs=(180, 150)), ValueError, "strictly increasing"),
        (dict(schedule="step", decay_epochs=(150, 150)), ValueError, "strictly increasing"),
        (dict(schedule="step", decay_epochs=(0,)), ValueError, "decay_epochs"),
        (dict(schedule="step", decay_epochs=(1,), decay_factor=0.0), ValueError, "decay_factor"),
        (dict(schedule="step", decay_epochs=(1,), decay_factor=10.0), ValueError, "decay_factor"),
        (dict(schedule="cosine", warmup_epochs=11), ValueError, "warmup of 110 steps is longer"),
        (dict(schedule="cosine", warmup_steps=100), ValueError, "longer than the run"),
        (dict(schedule="warmup_constant", warmup_steps=101), ValueError, "longer than the run"),
        (dict(schedule="cosine", warmup_steps=5, warmup_epochs=1), ValueError, "not both"),
        (dict(schedule="cosine", warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(schedule="cosine", warmup_steps=2.5), ValueError, "warmup_steps"),
        (dict(schedule="step", decay_epochs=(1,), warmup_steps=5), ValueError, "warmup is only"),
        (dict(schedule="cosine", end_lr_factor=2.0), ValueError, "end_lr_factor"),
    ],
)
def test_config_errors_name_the_field(fields, error, match):
  with pytest.raises(error, match=match):
    make_optimizer(config(**{**BASE, **fields}), steps_per_epoch=SPE, total_steps=100)


@pytest.mark.parametrize(
    "kwargs", [dict(steps_per_epoch=0, total_steps=10), dict(steps_per_epoch=1, total_steps=1.5)]
)
def test_step_counts_must_be_positive_ints(kwargs):
  with pytest.raises(ValueError, match="steps"):
    make_optimizer(config(**BASE), **kwargs)


def test_decay_mask_rejects_bad_regex():
  with pytest.raises(ValueError, match="weight_decay_mask: invalid regex"):
    decay_mask(tiny_params(), "[")

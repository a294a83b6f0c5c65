"""Tests for `inhernet_jax.decomposition.spec`: validation, rule matching and per-layer plans."""

import math

import flax.linen as nn
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from inhernet_jax import InherDense, InherSpec, LayerPlan
from inhernet_jax.decomposition.policy import layer_plan, needs_values


def count_inherited(m, n, r, heads, use_bias):
  """Parameter count written out from the method notes (independent of the library)."""
  gate = (r * heads + heads) if heads > 1 else 0
  return m * r + heads * r * n + (heads * n if use_bias else 0) + gate


def count_dense(m, n, use_bias):
  return m * n + (n if use_bias else 0)


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "rank, error",
    [
        (0, ValueError),
        (-3, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-float("inf"), ValueError),
        (0.0, ValueError),
        (1.5, ValueError),
        (-0.5, ValueError),
        (True, TypeError),
        (False, TypeError),
        ("4", TypeError),
        ([4], TypeError),
    ],
)
def test_bad_rank_names_the_argument(rank, error):
  with pytest.raises(error, match=r"rank"):
    InherSpec(rank=rank)


@pytest.mark.parametrize("name", ["energy", "param_ratio"])
@pytest.mark.parametrize(
    "value, error",
    [(0.0, ValueError), (1.01, ValueError), (-0.2, ValueError), (float("nan"), ValueError), (True, TypeError), ("0.5", TypeError)],
)
def test_fraction_policies_must_be_in_unit_interval(name, value, error):
  with pytest.raises(error, match=name):
    InherSpec(**{name: value})


@pytest.mark.parametrize(
    "heads, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError), ("2", TypeError), (True, TypeError), (None, TypeError)]
)
def test_bad_heads_names_the_argument(heads, error):
  with pytest.raises(error, match=r"heads"):
    InherSpec(rank=4, heads=heads)


def test_valid_specs_construct():
  for kwargs in [dict(rank=1), dict(rank=1.0), dict(rank=0.01), dict(energy=1.0), dict(param_ratio=0.3), dict(rank=8, heads=7), dict()]:
    InherSpec(**kwargs)


def test_bad_method():
  with pytest.raises(ValueError, match="method"):
    InherSpec(rank=2, method="lanczos")


def test_invalid_regex_names_rule_index_and_pattern():
  with pytest.raises(ValueError, match=r"rules\[1\].*'a\(b'"):
    InherSpec(rank=2, rules=((r"ok/.*", 2), (r"a(b", "skip")))


@pytest.mark.parametrize("rules", ["conv/.*", {"conv/.*": 2}, 3])
def test_rules_must_be_a_sequence(rules):
  with pytest.raises(TypeError, match="rules"):
    InherSpec(rank=2, rules=rules)


@pytest.mark.parametrize("rule", [("a", 2, 3), (3, 2), "a"])
def test_rule_must_be_a_pair(rule):
  with pytest.raises(TypeError, match=r"rules\[0\]"):
    InherSpec(rank=2, rules=(rule,))


@pytest.mark.parametrize(
    "kwargs",
    [dict(rank=2, energy=0.9), dict(rank=0.5, param_ratio=0.5), dict(energy=0.9, param_ratio=0.5)],
)
def test_more_than_one_policy(kwargs):
  with pytest.raises(ValueError, match="one of"):
    InherSpec(**kwargs)


@pytest.mark.parametrize(
    "action",
    [{"rank": 2, "energy": 0.5}, {"rank": 2, "fraction": 0.5}, {"energy": 0.5, "param_ratio": 0.5}, {"rank": 2, "param_ratio": 0.5}],
)
def test_more_than_one_policy_in_an_action(action):
  with pytest.raises(ValueError, match=r"rules\[0\]"):
    InherSpec(rank=2, rules=(("x", action),))


def test_float_rank_and_fraction_in_one_action_is_rejected():
  with pytest.raises(ValueError, match=r"rules\[0\]"):
    InherSpec(rank=2, rules=(("x", {"rank": 0.25, "fraction": 0.5}),))


def test_replace_revalidates():
  spec = InherSpec(rank=2)
  with pytest.raises(ValueError, match="heads"):
    spec.replace(heads=0)
  with pytest.raises(ValueError, match="rank"):
    spec.replace(rank=0)


# --------------------------------------------------------------- action normalisation
@pytest.mark.parametrize(
    "action, normalised",
    [
        (4, (("rank", 4),)),
        (0.25, (("fraction", 0.25),)),
        (1.0, (("fraction", 1.0),)),
        ("skip", (("skip", True),)),
        ({"rank": 3, "heads": 2}, (("heads", 2), ("rank", 3))),
        ({"rank": 0.5}, (("fraction", 0.5),)),
        ({"fraction": 0.5, "heads": 3}, (("fraction", 0.5), ("heads", 3))),
        ({"energy": 0.9}, (("energy", 0.9),)),
        ({"param_ratio": 0.2, "stack": 1}, (("param_ratio", 0.2), ("stack", 1))),
        ({"stack": 2}, (("stack", 2),)),
        ({"skip": True}, (("skip", True),)),
    ],
)
def test_action_normalisation(action, normalised):
  spec = InherSpec(rank=2, rules=(("x/kernel", action),))
  assert spec.rules == (("x/kernel", normalised),)
  index, matched = spec.match("x/kernel")
  assert index == 0 and matched == dict(normalised)
  # Normalised rules are accepted again unchanged (replace / resolve round trip).
  assert InherSpec(rank=2, rules=spec.rules) == spec


@pytest.mark.parametrize(
    "action, error, match",
    [
        ({"ranks": 2}, ValueError, "ranks"),
        ({"rank": 2, "bogus": 1}, ValueError, "bogus"),
        ("drop", ValueError, "drop"),
        (True, TypeError, r"rules\[0\]"),
        ([2], TypeError, r"rules\[0\]"),
        (None, TypeError, r"rules\[0\]"),
        (0, ValueError, r"rules\[0\].*rank"),
        (-2, ValueError, r"rules\[0\].*rank"),
        (float("nan"), ValueError, r"rules\[0\].*rank"),
        (1.5, ValueError, r"rules\[0\].*rank"),
        ({"heads": 0}, ValueError, r"rules\[0\].*heads"),
        ({"heads": 1.5}, TypeError, r"rules\[0\].*heads"),
        ({"stack": -1}, ValueError, r"rules\[0\].*stack"),
        ({"energy": 0.0}, ValueError, r"rules\[0\].*energy"),
        ({"param_ratio": 2.0}, ValueError, r"rules\[0\].*param_ratio"),
        ({"fraction": 1.5}, ValueError, r"rules\[0\]"),
    ],
)
def test_bad_actions(action, error, match):
  with pytest.raises(error, match=match):
    InherSpec(rank=2, rules=(("x/kernel", action),))


@pytest.mark.parametrize("fraction", ["0.5", True])
def test_fraction_action_rejects_non_numbers(fraction):
  with pytest.raises(TypeError, match=r"rules\[0\]"):
    InherSpec(rank=2, rules=(("x/kernel", {"fraction": fraction}),))


# ------------------------------------------------------------------------- matching
def test_first_matching_rule_wins():
  a = InherSpec(rank=2, rules=((r"blk/.*", 3), (r"blk/conv/kernel", "skip")))
  b = InherSpec(rank=2, rules=((r"blk/conv/kernel", "skip"), (r"blk/.*", 3)))
  assert layer_plan(a, "blk/conv/kernel", 64, 64, True) == LayerPlan(True, 3, 1, 64)
  assert not layer_plan(b, "blk/conv/kernel", 64, 64, True).factorize
  assert layer_plan(b, "blk/other/kernel", 64, 64, True) == LayerPlan(True, 3, 1, 64)
  assert a.match("blk/conv/kernel")[0] == 0 and b.match("blk/conv/kernel")[0] == 0


def test_rules_fully_match():
  spec = InherSpec(rank=2, rules=((r"conv/kernel", "skip"),))
  assert spec.match("conv/kernel")[0] == 0
  assert spec.match("block/conv/kernel") == (None, {})  # No search semantics.
  assert spec.match("conv/kernel_2") == (None, {})
  assert layer_plan(spec, "block/conv/kernel", 64, 64, False).rank == 2


def test_rule_overrides_heads_and_policy():
  spec = InherSpec(rank=2, heads=3, rules=((r"a/kernel", {"heads": 1}), (r"b/kernel", {"rank": 0.5})))
  assert layer_plan(spec, "a/kernel", 64, 64, True) == LayerPlan(True, 2, 1, 64)
  assert layer_plan(spec, "b/kernel", 256, 32, True) == LayerPlan(True, 16, 3, 32)
  assert layer_plan(spec, "c/kernel", 64, 64, True) == LayerPlan(True, 2, 3, 64)


def test_skip_rule_keeps_layer():
  spec = InherSpec(rank=2, rules=((r"a/kernel", "skip"),))
  plan = layer_plan(spec, "a/kernel", 64, 64, True)
  assert not plan.factorize and plan.rank == 0 and plan.reason


def test_stack_axes():
  spec = InherSpec(rank=2, rules=((r"layers/.*", {"stack": 1}),))
  assert spec.stack_axes("layers/mlp/kernel") == 1
  assert spec.stack_axes("head/kernel") is None


# ---------------------------------------------------------------------------- plans
@hypothesis.settings(max_examples=25)
# Factorisations with exactly the teacher's count (r (m + n) = m n): they save nothing.
@hypothesis.example(m=2, n=2, rank=1, heads=1, use_bias=False)
@hypothesis.example(m=6, n=3, rank=2, heads=1, use_bias=True)
@hypothesis.example(m=8, n=8, rank=4, heads=1, use_bias=False)
@hypothesis.given(
    m=st.integers(1, 80),
    n=st.integers(1, 80),
    rank=st.integers(1, 90),
    heads=st.integers(1, 4),
    use_bias=st.booleans(),
)
def test_plan_keeps_layers_that_save_nothing(m, n, rank, heads, use_bias):
  full = min(m, n)
  saves = rank < full and count_inherited(m, n, rank, heads, use_bias) < count_dense(m, n, use_bias)
  plan = layer_plan(InherSpec(rank=rank, heads=heads), "l/kernel", m, n, use_bias)
  assert plan.factorize == saves
  assert plan.rank == (rank if saves else 0)
  assert plan.heads == heads and plan.full_rank == full
  assert bool(plan.reason) == (not saves)
  # Forced: always factorised, rank capped at full rank.
  forced = layer_plan(InherSpec(rank=rank, heads=heads, skip_if_no_saving=False), "l/kernel", m, n, use_bias)
  assert forced == LayerPlan(True, min(rank, full), heads, full)


@hypothesis.settings(max_examples=25)
@hypothesis.given(m=st.integers(1, 300), n=st.integers(1, 300), fraction=st.floats(1e-3, 1.0))
def test_fraction_policy(m, n, fraction):
  full = min(m, n)
  plan = layer_plan(InherSpec(rank=fraction, skip_if_no_saving=False), "l/kernel", m, n, True)
  assert 1 <= plan.rank <= full
  # The smallest rank that is at least the fraction of the full rank.
  assert plan.rank >= fraction * full - 1e-6
  assert plan.rank == 1 or plan.rank - 1 < fraction * full


@hypothesis.settings(max_examples=25)
@hypothesis.given(
    m=st.integers(1, 200), n=st.integers(1, 200), ratio=st.floats(1e-3, 1.0), heads=st.integers(1, 3), use_bias=st.booleans()
)
def test_param_ratio_policy_respects_budget(m, n, ratio, heads, use_bias):
  plan = layer_plan(InherSpec(param_ratio=ratio, heads=heads), "l/kernel", m, n, use_bias)
  full = min(m, n)
  budget = ratio * count_dense(m, n, use_bias)
  fits = [k for k in range(1, full + 1) if count_inherited(m, n, k, heads, use_bias) <= budget]
  best = max(fits, default=0)
  saves = 1 <= best < full and count_inherited(m, n, best, heads, use_bias) < count_dense(m, n, use_bias)
  assert plan.factorize == saves
  assert plan.rank == (best if saves else 0)
  if saves:
    assert count_inherited(m, n, plan.rank, heads, use_bias) <= budget


def test_energy_policy_needs_singular_values():
  spec = InherSpec(energy=0.9)
  assert needs_values(spec, "any/kernel")
  with pytest.raises(ValueError, match="resolve"):
    layer_plan(spec, "any/kernel", 64, 32, True)
  s = np.array([10.0, 5.0, 1.0] + [0.1] * 29)
  total = np.sum(s**2)
  plan = layer_plan(spec, "any/kernel", 64, 32, True, singular_values=s)
  assert plan.factorize
  assert np.sum(s[: plan.rank] ** 2) / total >= 0.9 > np.sum(s[: plan.rank - 1] ** 2) / total


def test_energy_rule_and_needs_data():
  spec = InherSpec(rank=4, rules=((r"a/kernel", {"energy": 0.5}), (r"b/kernel", "skip")))
  assert needs_values(spec, "a/kernel")
  assert not needs_values(spec, "b/kernel") and not needs_values(spec, "c/kernel")
  with pytest.raises(ValueError, match="resolve"):
    layer_plan(spec, "a/kernel", 64, 64, True)
  # A rank rule overrides a global energy policy.
  spec = InherSpec(energy=0.9, rules=((r"a/kernel", 4), (r"b/kernel", "skip")))
  assert not needs_values(spec, "a/kernel") and not needs_values(spec, "b/kernel")
  assert layer_plan(spec, "a/kernel", 64, 64, True).rank == 4


def test_no_policy_is_an_error_naming_the_path():
  with pytest.raises(ValueError, match="blk/kernel"):
    layer_plan(InherSpec(), "blk/kernel", 8, 8, True)


# ------------------------------------------------------------- hashing / as a static
def test_hashable_and_equal():
  a = InherSpec(rank=2, heads=3, rules=[("x/.*", {"rank": 4, "heads": 2}), ("y", "skip")])
  b = InherSpec(rank=2, heads=3, rules=(("x/.*", {"heads": 2, "rank": 4}), ("y", "skip")))
  assert a == b and hash(a) == hash(b)
  c = InherSpec(rank=2, heads=2, rules=b.rules)
  assert a != c
  assert len({a, b, c}) == 2
  # All fields are static: a spec is an empty pytree.
  assert jax.tree.leaves(a) == []


def test_static_jit_argument():
  traces = []

  def f(x, spec):
    traces.append(spec)
    return x * spec.rank + spec.heads

  jf = jax.jit(f, static_argnames="spec")
  x = jnp.ones(3)
  s1, s2 = InherSpec(rank=2, heads=1), InherSpec(rank=3, heads=2)
  np.testing.assert_array_equal(jf(x, spec=s1), 3 * np.ones(3))
  np.testing.assert_array_equal(jf(x, spec=InherSpec(rank=2, heads=1)), 3 * np.ones(3))
  assert len(traces) == 1  # An equal spec hits the cache.
  np.testing.assert_array_equal(jf(x, spec=s2), 5 * np.ones(3))
  assert len(traces) == 2


def test_flax_module_field():
  spec = InherSpec(rank=2, heads=2)

  class Net(nn.Module):
    spec: InherSpec | None = None

    @nn.compact
    def __call__(self, x):
      return InherDense(8, spec=self.spec, name="fc")(x)

  x = jnp.ones((2, 8))
  shapes = jax.eval_shape(Net(spec=spec).init, jax.random.key(0), x)["params"]
  assert set(shapes["fc"]) == {"down", "gate", "up"}
  assert jax.eval_shape(Net(spec=spec).clone(spec=None).init, jax.random.key(0), x)["params"]["fc"].keys() == {"kernel", "bias"}
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.1, s.dtype), shapes)
  out = jax.jit(Net(spec=spec).apply)({"params": params}, x)
  assert out.shape == (2, 8)
  # Modules with equal specs are equal (flax relies on this for caching/cloning).
  assert Net(spec=spec) == Net(spec=InherSpec(rank=2, heads=2))
  assert math.isfinite(float(jnp.sum(out)))


# ---------------------------------------------------------------------- data-aware
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"data_aware": 1}, TypeError, "data_aware"),
        ({"data_aware": "yes"}, TypeError, "data_aware"),
        ({"damping": -0.1}, ValueError, "damping"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"damping": "0.1"}, TypeError, "damping"),
        ({"damping": True}, TypeError, "damping"),
        ({"rules": (("x/kernel", {"data_aware": 1}),)}, TypeError, r"rules\[0\].*data_aware"),
    ],
)
def test_bad_data_aware_settings(kwargs, error, match):
  with pytest.raises(error, match=match):
    InherSpec(rank=2, **kwargs)


def test_data_aware_is_opt_in_globally_or_per_rule():
  plain = InherSpec(rank=2)
  assert not plain.data_aware and plain.damping == 0.01
  assert layer_plan(plain, "a/kernel", 64, 64, True) == LayerPlan(True, 2, 1, 64)  # Unchanged.
  assert layer_plan(InherSpec(rank=2, data_aware=True, damping=0), "a/kernel", 64, 64, True) == LayerPlan(
      True, 2, 1, 64, data_aware=True)
  spec = InherSpec(rank=2, rules=(
      (r"a/kernel", {"data_aware": True}), (r"b/kernel", {"data_aware": True, "rank": 70}),
      (r"c/kernel", "skip")))
  assert spec.rules[0] == (r"a/kernel", (("data_aware", True),))
  assert InherSpec(rank=2, rules=spec.rules) == spec  # Normalised rules round-trip.
  assert layer_plan(spec, "a/kernel", 64, 64, True).data_aware
  assert not layer_plan(spec, "b/kernel", 64, 64, True).data_aware  # Kept: nothing to truncate.
  assert not layer_plan(spec, "c/kernel", 64, 64, True).data_aware
  assert not layer_plan(spec, "d/kernel", 64, 64, True).data_aware
  off = InherSpec(rank=2, data_aware=True, rules=((r"a/kernel", {"data_aware": False}),))
  assert not layer_plan(off, "a/kernel", 64, 64, True).data_aware and layer_plan(off, "d/kernel", 64, 64, True).data_aware
  # Different settings, different (hashable, static) specs.
  assert len({plain, plain.replace(data_aware=True), plain.replace(damping=0.1)}) == 3


def test_rank_one_and_full_rank_fraction_are_different_specs():
  # rank=1 is one direction, rank=1.0 the full rank: caches keyed on specs must not mix them.
  one, full = InherSpec(rank=1, heads=3), InherSpec(rank=1.0, heads=3)
  assert one != full and len({one: 0, full: 1}) == 2
  assert full == InherSpec(rank=1.0, heads=3) and hash(full) == hash(InherSpec(rank=1.0, heads=3))
  assert layer_plan(one, "k", 8, 8, True).rank == 1 and layer_plan(full, "k", 8, 8, True).full_rank == 8
  assert layer_plan(full.replace(skip_if_no_saving=False), "k", 8, 8, True).rank == 8


@pytest.mark.parametrize(
    "policy, expected",
    [({"rank": 13}, 16), ({"rank": 0.1}, 8), ({"rank": 0.9}, None),
     ({"param_ratio": 0.3}, 8), ({"rank": 60}, None)],
)
def test_rank_multiple_rounds_every_policy(policy, expected):
  """Up for fixed and fraction ranks, down for param_ratio; a rank rounded up to the
  full rank (64) keeps the layer."""
  spec = InherSpec(heads=1, rank_multiple=8, **policy)
  plan = layer_plan(spec, "a/kernel", 64, 96, use_bias=False)
  if expected is None:
    assert not plan.factorize, plan
  else:
    assert plan.factorize and plan.rank == expected, plan
  plain = layer_plan(InherSpec(heads=1, **policy), "a/kernel", 64, 96, use_bias=False)
  if expected is not None and "param_ratio" in policy:
    assert plan.rank <= plain.rank  # Within the budget.
  elif expected is not None:
    assert plan.rank >= plain.rank


def test_rank_multiple_energy_rounds_up_and_is_validated():
  s = np.linspace(10, 1, 64)
  energy = layer_plan(InherSpec(energy=0.5, rank_multiple=16), "a/kernel", 64, 512, False, s)
  plain = layer_plan(InherSpec(energy=0.5), "a/kernel", 64, 512, False, s)
  assert energy.rank % 16 == 0 and plain.rank <= energy.rank < plain.rank + 16
  with pytest.raises(ValueError, match="rank_multiple"):
    InherSpec(rank=4, rank_multiple=0)

"""Tests for inhernet_jax.decomposition.budget: budgets, budget-matched per-layer ranks, summaries.

Cheap by design: NumPy params; spectra passed in where the weights do not matter; zoo
models only through abstract shapes (the only compiled work is one CLI run).
"""

import functools
import os
import pathlib
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.budget import random_budget, random_problem
from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition import budget
from inhernet_jax.training import checkpoint
from inhernet_jax.models import sizes
from inhernet_jax.decomposition import policy
from inhernet_jax.decomposition import spec as spec_lib
from inhernet_jax.training import trainer as train_lib
from inhernet_jax.decomposition.transform import inherit, planned_param_count
from inhernet_jax.decomposition.policy import layer_plan
from inhernet_jax.decomposition.spec import InherSpec

import launcher_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The properties below are of the plain energy objective (`allocate`'s default is
# "param_energy", tested on its own at the end).
_allocate = functools.partial(budget.allocate, objective="energy")

def net(shapes, rng=None, bias=True):
  """``{"l<i>": {"kernel", "bias"}}`` of random float32 kernels of the given shapes (the
  last axis is the output; a bias with leading axes marks a scan stack)."""
  rng = rng or np.random.default_rng(0)
  out = {}
  for i, shape in enumerate(shapes):
    out[f"l{i}"] = {"kernel": rng.standard_normal(shape).astype(np.float32)}
    if bias:
      lead = shape[:-2] if len(shape) == 3 else ()
      out[f"l{i}"]["bias"] = np.zeros((*lead, shape[-1]), np.float32)
  return out


def with_spectrum(m, n, s, rng):
  """An ``m x n`` kernel whose singular values are ``s``."""
  u = np.linalg.qr(rng.standard_normal((m, m)))[0][:, : len(s)]
  v = np.linalg.qr(rng.standard_normal((n, n)))[0][:, : len(s)]
  return ((u * s) @ v.T).astype(np.float32)


def kept(s, rank):
  e = np.square(np.asarray(s, np.float64))
  return e[:rank].sum() / e.sum()


def ranks(spec, paths):
  """Path -> rank (0: kept dense) as the spec's exact rules say."""
  out = {}
  for path in paths:
    action = spec.match(path)[1]
    out[path] = 0 if action.get("skip") else action["rank"]
  return out


# ----------------------------------------------------------------------- budgets
def test_budget_takes_numbers_names_are_read_by_sizes():
  # Names are read a layer up (`sizes`); `budget` takes numbers and imports no model zoo.
  params = net([(10, 20), (20, 5)])
  assert "models" not in vars(budget) and not hasattr(budget, "parameter_budget")
  size = sizes.parameter_budget(params, "student:mlp")
  assert size == models.param_count("mlp", num_classes=10)
  for fn in (budget.allocate, budget.uniform):
    with pytest.raises(ValueError, match="'student:mlp'"):
      fn(params, "student:mlp")


# -------------------------------------------------------------------- allocation
@pytest.mark.parametrize("heads, bias", [(1, True), (3, True), (2, False)])
def test_allocation_fits_and_counts_exactly(heads, bias):
  # Dense, conv and scan-stacked kernels; without biases nothing marks the stack.
  params = net([(24, 16), (3, 3, 4, 12), (2, 12, 10), (16, 30)], bias=bias)
  total = accounting.param_count(params)
  for fraction in (0.45, 0.7, 0.95):
    target = int(fraction * total)
    spec, info = _allocate(params, target, heads=heads, return_info=True)
    assert info["budget"] == target and info["params"] <= target
    assert planned_param_count(params, spec) == info["params"]
    assert budget.summary(params, spec)["params"] == info["params"]
    assert len(spec.rules) == 4  # One exact rule per kernel, nothing else.
    assert spec.rank is None and spec.heads == heads
  inherited = inherit(params, spec)
  assert accounting.param_count(inherited) == info["params"]
  if bias:
    assert spec.match("l2/kernel")[1]["stack"] == 1


def test_budget_of_the_whole_teacher_keeps_every_layer_dense():
  params = net([(24, 16), (16, 30)])
  spec, info = _allocate(params, 1.0, heads=2, return_info=True)
  assert info["params"] == accounting.param_count(params)
  assert ranks(spec, ["l0/kernel", "l1/kernel"]) == {"l0/kernel": 0, "l1/kernel": 0}


def _zoo(name, **kwargs):
  model = models.create(name, **kwargs)
  shapes = models.variable_shapes(model, name)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  return model, params


@pytest.mark.parametrize("name, kwargs", [
    ("cnn", dict(num_classes=10, widths=(8, 16, 32))),
    ("gpt2_small", dict(num_classes=50, width=32, depth=2, num_heads=2, mlp_dim=64, max_len=16,
                        scan=True)),
])
def test_zoo_model_matches_inherit(name, kwargs):
  model, params = _zoo(name, **kwargs)
  rules = models.preset("default", name)
  target = int(0.55 * accounting.param_count(params))
  spec, info = _allocate(params, target, heads=3, rules=rules, return_info=True)
  new = inherit(params, spec)
  want = models.variable_shapes(model.clone(spec=spec), name)["params"]
  assert jax.tree.structure(new) == jax.tree.structure(want)
  assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, new, want)) == [True] * len(
      jax.tree.leaves(new))
  assert accounting.param_count(new) == info["params"] <= target
  assert any(r > 0 for r in info["ranks"].values())  # Something is factorised.
  for path in ("stem/kernel", "head/kernel", "embed/kernel"):
    if path in info["ranks"]:
      raise AssertionError(f"{path} is skipped by the preset, not allocated")
  if name == "gpt2_small":
    assert all(spec.match(p)[1]["stack"] == 1 for p in info["ranks"])


def test_heads_are_counted():
  """One 16x16 layer: rank 1 costs 16 + 3 * (16 + 16) + gate 3 + 3 = 118 with three
  heads, each further rank 16 + 3 * 16 + 3 = 67."""
  params = net([(16, 16)])
  assert policy.inherited_params(16, 16, 1, 3) == 118
  spec, info = _allocate(params, 118 + 2 * 67, heads=3, return_info=True)
  assert info["ranks"] == {"l0/kernel": 3} and info["params"] == 118 + 2 * 67
  gate = inherit(params, spec)["l0"]["gate"]["kernel"]
  assert gate.shape == (3, 3)
  _, info = _allocate(params, 118 + 2 * 67 - 1, heads=3, return_info=True)
  assert info["ranks"] == {"l0/kernel": 2}
  _, info = _allocate(params, 118 + 2 * 67, heads=1, return_info=True)
  assert info["ranks"]["l0/kernel"] > 3  # One head: cheaper ranks.


def test_rules_skip_and_fix_layers():
  params = net([(24, 16), (16, 30), (30, 20), (20, 10)])
  rules = ((r"l0/kernel", "skip"), (r"l1/kernel", {"rank": 2}), (r"l3/kernel", {"heads": 1}))
  spec, info = _allocate(params, 0.6, heads=2, rules=rules, return_info=True)
  assert set(info["ranks"]) == {"l2/kernel", "l3/kernel"}  # Only these are free.
  assert spec.match("l0/kernel")[1]["skip"]
  assert spec.match("l1/kernel")[1] == {"rank": 2, "heads": 2, "stack": 0}
  assert spec.match("l3/kernel")[1].get("heads", 1) == 1 or spec.match("l3/kernel")[1]["skip"]
  target = int(0.6 * accounting.param_count(params))
  assert planned_param_count(params, spec) == info["params"] <= target
  new = inherit(params, spec)
  np.testing.assert_array_equal(new["l0"]["kernel"], params["l0"]["kernel"])  # Dense size.
  assert new["l1"]["down"]["kernel"].shape == (16, 2)


def test_infeasible_budget_names_both_counts():
  params = net([(24, 16), (16, 30)])
  floor = planned_param_count(params, InherSpec(rank=1, heads=3))
  with pytest.raises(ValueError, match=f"budget {floor - 1:,} parameters is infeasible.*"
                                       f"heads=3.*gives {floor:,} parameters"):
    _allocate(params, floor - 1, heads=3)
  _allocate(params, floor, heads=3)  # Rank 1 everywhere fits exactly.
  with pytest.raises(ValueError, match="method must be one of"):
    _allocate(params, floor, method="best")


def test_base_spec_fields_are_kept():
  params = net([(24, 16), (16, 30)])
  base = InherSpec(energy=0.5, heads=2, method="exact", rules=((r"l1/kernel", "skip"),))
  spec = _allocate(params, 0.8, spec=base)
  assert (spec.method, spec.heads, spec.energy, spec.rank) == ("exact", 2, None, None)
  assert spec.rules[-1] == base.rules[-1]  # The base rules stay, after the exact ones.
  assert _allocate(params, 0.8, spec=base, heads=1).heads == 1
  assert budget.uniform(params, 0.8, spec=base).method == "exact"
  if "data_aware" in spec_lib._ACTION_KEYS:  # Other keys of a path's rule stay too.
    rules = ((r"l0/kernel", {"data_aware": True}),)
    spec = _allocate(params, 0.5, rules=rules, spec=InherSpec(data_aware=True))
    assert spec.data_aware and spec.match("l0/kernel")[1]["data_aware"]


# --------------------------------------------------------------- which layers win
def _flat_and_decaying():
  params = {p: {"kernel": np.zeros((32, 32), np.float32), "bias": np.zeros(32, np.float32)}
            for p in ("flat", "decay")}
  spectra = {"flat/kernel": np.ones(32), "decay/kernel": 2.0 ** (-np.arange(32) / 2)}
  return params, spectra  # Rank 1: 96 parameters each, every further rank 64, dense 1056.


def test_first_ranks_go_to_the_decaying_layer_the_rest_to_the_flat_one():
  """The objective rewards missing energy: each rank of the decaying layer keeps half
  what the last kept (1/4, 1/8, ... of its energy), each rank of the flat one 1/32. So a
  tight budget goes to the decaying layer, until its next rank is worth less than a flat
  one (rank 5: 1/32); then the flat layer gets more rank, and dense once affordable (it
  keeps 31/32 for 960 parameters)."""
  params, spectra = _flat_and_decaying()
  paths = ["flat/kernel", "decay/kernel"]
  for method in budget.METHODS:
    tight = _allocate(params, 2 * 96 + 64, spectra=spectra, method=method)
    assert ranks(tight, paths) == {"flat/kernel": 1, "decay/kernel": 2}
    more = _allocate(params, 2 * 96 + 10 * 64, spectra=spectra, method=method)
    assert ranks(more, paths) == {"flat/kernel": 7, "decay/kernel": 5}
    dense = _allocate(params, 96 + 1056 + 4 * 64, spectra=spectra, method=method)
    assert ranks(dense, paths) == {"flat/kernel": 0, "decay/kernel": 5}


def test_spectra_override_the_weights():
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": with_spectrum(32, 32, 2.0 ** -np.arange(32), rng)},
            "b": {"kernel": with_spectrum(32, 32, np.ones(32), rng)}}
  target = 2 * 64 + 10 * 64  # No biases: rank r costs 64 r.
  own = _allocate(params, target, return_info=True)[1]["ranks"]
  assert own["b/kernel"] > own["a/kernel"]  # b is the flat one.
  # Swapped spectra (a shorter one is padded with zeros) swap the ranks.
  swapped = {"a/kernel": np.ones(32), "b/kernel": 2.0 ** -np.arange(20)}
  _, info = _allocate(params, target, spectra=swapped, return_info=True)
  assert info["ranks"] == {"a/kernel": own["b/kernel"], "b/kernel": own["a/kernel"]}
  spec = _allocate(params, target, spectra=swapped)
  rows = {r["path"]: r for r in budget.summary(params, spec, spectra=swapped)["layers"]}
  assert rows["a/kernel"]["energy"] == pytest.approx(kept(np.ones(32), info["ranks"]["a/kernel"]))
  # Stacked spectra: (*stack, k).
  for bad, match in [({"a/kernel": np.ones((2, 32))}, r"spectra\['a/kernel'\]: expected shape"),
                     ({"a/kernel": np.ones(33)}, r"spectra\['a/kernel'\]: expected shape"),
                     ({"a/kernel": np.arange(32.0)}, "descending"),
                     ({"a/kernel": -np.ones(32)}, ">= 0"),
                     ({"c/kernel": np.ones(32)}, r"spectra names \['c/kernel'\]")]:
    with pytest.raises(ValueError, match=match):
      _allocate(params, target, spectra=bad)


# ------------------------------------------------------------- optimality checks
def _energy(params, spec, spectra):
  return budget.summary(params, spec, spectra=spectra)["energy_sum"]


@hypothesis.settings(max_examples=8)
@hypothesis.given(seed=st.integers(0, 2**32 - 1), layers=st.integers(2, 4),
                  heads=st.integers(1, 3), fraction=st.floats(0.3, 1.0))
def test_greedy_keeps_at_least_the_uniform_energy(seed, layers, heads, fraction):
  params, spectra = random_problem(np.random.default_rng(seed), layers)
  target = int(fraction * accounting.param_count(params))
  floor = planned_param_count(params, InherSpec(rank=1, heads=heads))
  hypothesis.assume(floor <= target)
  greedy = _allocate(params, target, heads=heads, spectra=spectra)
  flat = budget.uniform(params, target, heads=heads)
  assert planned_param_count(params, greedy) <= target
  assert planned_param_count(params, flat) <= target
  assert _energy(params, greedy, spectra) >= _energy(params, flat, spectra) - 1e-9


@pytest.mark.parametrize("objective", ["energy", "log_energy"])  # param_energy: below.
def test_exact_is_the_brute_force_optimum(objective):
  score = np.log if objective == "log_energy" else lambda e: e
  rng = np.random.default_rng(2)
  for layers in (3, 3, 4):
    params, spectra = random_problem(rng, layers, size=14)
    paths, heads = sorted(spectra), int(rng.integers(1, 3))
    total = accounting.param_count(params)
    floor = planned_param_count(params, InherSpec(rank=1, heads=heads))
    target = int(rng.integers(floor, total + 1))
    # Each layer's options alone (rank r, or 0: dense), the others dense: parameters
    # above the teacher's and kept energy (a rank that saves nothing is kept dense).
    costs, values = [], []
    for p in paths:
      m, n = params[p.split("/")[0]]["kernel"].shape
      costs.append([]), values.append([])
      for r in range(min(m, n) + 1):
        spec = InherSpec(heads=heads, rules=((p, {"rank": r} if r else "skip"), (".*", "skip")))
        costs[-1].append(planned_param_count(params, spec) - total)
        energy = kept(spectra[p], r) if r and layer_plan(spec, p, m, n, True).factorize else 1.0
        values[-1].append(score(energy))
    grid = lambda xs: sum(np.ix_(*map(np.asarray, xs)))  # Every combination.
    best = grid(values)[total + grid(costs) <= target].max()
    exact = _allocate(params, target, heads=heads, spectra=spectra, method="exact",
                            objective=objective)
    rows = budget.summary(params, exact, spectra=spectra)["layers"]
    assert sum(score(r["energy"]) for r in rows) == pytest.approx(best, abs=1e-9)
    assert planned_param_count(params, exact) <= target


@pytest.mark.parametrize("objective", budget.OBJECTIVES)
def test_greedy_is_close_to_the_optimum(objective):
  rng = np.random.default_rng(1)
  gaps = []
  for _ in range(40):
    params, spectra = random_problem(rng, int(rng.integers(2, 6)))
    drawn = random_budget(rng, params)
    if drawn is None:
      continue
    heads, target = drawn
    greedy = _allocate(params, target, heads=heads, spectra=spectra, objective=objective,
                             return_info=True)[1]
    exact = _allocate(params, target, heads=heads, spectra=spectra, method="exact",
                            objective=objective, return_info=True)[1]
    assert greedy["params"] <= target
    gap = exact["objective"] - greedy["objective"]
    assert -1e-9 <= gap <= 0.1 * len(spectra)  # Exact is optimal; greedy close.
    gaps.append(gap)
  assert np.mean(gaps) < 0.01 and np.mean(np.array(gaps) < 1e-9) > 0.8


# -------------------------------------------------------------------------- CLI
def test_launch_inherit_with_a_budget(tmp_path):
  model = models.create("cnn", num_classes=10, widths=(8, 16, 32))
  x = jnp.zeros((1, 8, 8, 1), jnp.float32)
  params = model.init(jax.random.key(0), x, train=False)["params"]
  state = train_lib.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
  mngr = checkpoint.manager(tmp_path / "teacher" / "checkpoints")
  checkpoint.save(mngr, 0, state, {"history": {}})
  mngr.wait_until_finished()
  mngr.close()
  env = launcher_env.env()
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.inherit", "--config=configs/digits.py:local",
       f"--teacher={tmp_path / 'teacher'}", "--budget=0.6", "--heads=2", f"--out={out}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  target = int(0.6 * accounting.param_count(params))
  assert f"budget {target:,} parameters, greedy allocation" in proc.stdout
  spec = budget.allocate(jax.tree.map(np.asarray, params), target, heads=2,
                         rules=models.preset("default", "cnn"))
  abstract = jax.eval_shape(lambda: model.clone(spec=spec).init(jax.random.key(0), x, train=False))
  loaded = checkpoint.load_variables(out, abstract)
  assert accounting.param_count(loaded["params"]) == planned_param_count(params, spec) <= target


def test_launch_inherit_takes_one_of_rank_energy_budget(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.inherit", "--config=configs/digits.py:local",
       f"--teacher={tmp_path}", "--rank=4", "--budget=0.5", f"--out={tmp_path / 'out'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "give exactly one of --rank, --energy and --budget (got --rank, --budget)" in proc.stderr


def test_param_energy_weights_layers_by_size_above_a_rank_floor():
  # A small and a 4x larger layer with the same spectrum: the plain sum spends the
  # budget on the small one (dense) and leaves the large one at rank 3; weighted by
  # size, the large one gets more rank than uniform and the small one keeps at least half
  # the uniform rank (the default floor); rank_floor=1.0 is the uniform allocation.
  shapes = {"a": (64, 64), "b": (256, 128)}
  params = {k: {"kernel": np.zeros(s, np.float32), "bias": np.zeros(s[-1], np.float32)}
            for k, s in shapes.items()}
  spectra = {f"{k}/kernel": np.linspace(1.0, 0.1, min(s)) for k, s in shapes.items()}
  target = planned_param_count(params, InherSpec(rank=8, heads=2))
  assert budget.uniform(params, target, heads=2).rank == 8
  got = lambda **kw: _allocate(params, target, heads=2, spectra=spectra,
                                     return_info=True, **kw)[1]
  assert got(objective="energy")["ranks"] == {"a/kernel": 0, "b/kernel": 3}
  info = got(objective="param_energy")
  assert info["ranks"] == {"a/kernel": 5, "b/kernel": 9} and info["params"] <= target
  assert got(objective="param_energy", rank_floor=0.0)["ranks"] == {"a/kernel": 2, "b/kernel": 10}
  for objective in budget.OBJECTIVES:
    assert got(objective=objective, rank_floor=1.0)["ranks"] == {"a/kernel": 8, "b/kernel": 8}
  with pytest.raises(ValueError, match="rank_floor"):
    got(rank_floor=1.5)


def test_rank_multiple_uniform_is_rounded_and_allocate_refuses_it():
  params = net([(48, 64), (64, 40)])
  spec = budget.uniform(params, 0.5, spec=InherSpec(rank_multiple=4))
  assert spec.rank % 4 == 0 and spec.rank_multiple == 4
  assert planned_param_count(params, spec) <= accounting.budget_params(params, 0.5)
  with pytest.raises(ValueError, match="rank_multiple=4 is not supported"):
    budget.allocate(params, 0.5, spec=InherSpec(rank_multiple=4))

"""Fair baselines and the pieces benchmark: DKD's CE term and warm-up, the converged
Fashion-MNIST config's pieces, and the combined report's statistics (no training)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist_converged
from inhernet_jax.experiment import pieces
from inhernet_jax.training import losses

S = jax.random.normal(jax.random.key(0), (6, 5))
T = jax.random.normal(jax.random.key(1), (6, 5))
Y = jnp.arange(6) % 5


def test_dkd_objective_is_ce_plus_warmed_up_dkd():
  fn = losses.make_loss("dkd", alpha=1.0, beta=8.0, temperature=4.0, ce_weight=1.0,
                        warmup_steps=10)
  ce = losses.cross_entropy(S, Y)
  term = losses.dkd(S, T, Y, alpha=1.0, beta=8.0, temperature=4.0)
  np.testing.assert_allclose(fn(S, T, Y, step=0), ce, rtol=1e-6)
  np.testing.assert_allclose(fn(S, T, Y, step=5), ce + 0.5 * term, rtol=1e-6)
  np.testing.assert_allclose(fn(S, T, Y, step=30), ce + term, rtol=1e-6)
  with pytest.raises(ValueError, match="step"):
    fn(S, T, Y)


def test_dkd_without_the_objective_options_is_the_bare_term():
  fn = losses.make_loss("dkd", alpha=1.0, beta=8.0, temperature=4.0)
  np.testing.assert_allclose(fn(S, T, Y), losses.dkd(S, T, Y), rtol=1e-6)


@pytest.mark.parametrize("bad", [{"warmup_steps": -1}, {"warmup_steps": 1.5},
                                 {"ce_weight": -0.1}])
def test_dkd_objective_options_are_checked(bad):
  with pytest.raises((ValueError, TypeError)):
    losses.make_loss("dkd", **bad)


def test_every_piece_has_a_config_with_the_published_recipes():
  names = fmnist_converged.pieces()
  assert names[0] == ("teacher", 0) and len(names) == 1 + 3 * 12 + 6
  for name, seed in names:
    c = fmnist_converged.get_config(f"piece={name},seed={seed},root=/r,local=true")
    assert c.seeds == 1 and c.seed == seed
    if name != "teacher":
      assert c.teacher.checkpoint == "/r/teacher/seed_0/teacher"
  c = fmnist_converged.get_config("piece=student_dkd,root=/r,epochs=24,local=true")
  kwargs = c.method_defs.student_dkd.loss_kwargs
  assert (kwargs.alpha, kwargs.beta, kwargs.temperature, kwargs.ce_weight) == (1, 8, 4, 1)
  assert kwargs.warmup_epochs == 2.0  # 20 of mdistiller's 240 epochs, scaled to 24.
  kd = fmnist_converged.get_config("piece=student_kd,root=/r,local=true").method_defs
  assert (kd.student_kd.loss_kwargs.alpha, kd.student_kd.loss_kwargs.temperature) == (0.1, 4)
  abl = fmnist_converged.get_config("piece=ablate_symmetric,root=/r,local=true").method_defs
  assert abl.ablate_symmetric.variant == "symmetric"
  with pytest.raises(ValueError, match="root"):
    fmnist_converged.get_config("piece=student")
  with pytest.raises(ValueError, match="unknown piece"):
    fmnist_converged.get_config("piece=nope")


def test_welch_and_the_partial_report(tmp_path):
  assert pieces.welch([0.9, 0.91], [0.9]) is None
  t = pieces.welch([0.90, 0.91, 0.92], [0.88, 0.885, 0.89])
  assert t["diff"] == pytest.approx(0.025) and t["p"] < 0.05
  root = tmp_path / "root"

  def put(name, seed, final, kind="student"):
    d = pieces.piece_dir(str(root), name, seed)
    os.makedirs(d)
    run = {"method": "x", "label": name, "kind": kind, "seed": seed, "final_metric": final,
           "params": 100, "metric_name": "accuracy", "higher_is_better": True, "history": {}}
    with open(os.path.join(d, "results.json"), "w") as f:
      json.dump({"runs": [run]}, f)

  for s, (a, b) in enumerate([(0.80, 0.85), (0.81, 0.86)]):
    put("student", s, a)
    put("inherit_h3", s, b, "inhernet")
  todo = [("student", 0), ("student", 1), ("inherit_h3", 0), ("inherit_h3", 1), ("kd", 0)]
  out = pieces.combined_report(str(root), str(tmp_path / "out"), pieces=todo, title="t",
                               students=["student"], candidate="inherit_h3",
                               curve={"student": (25, "scratch")}, command="run me")
  assert out["missing"] == ["kd (seed 0)"]
  assert out["welch"]["best_student"] == "student"
  assert out["welch"]["test"]["diff"] == pytest.approx(0.05)
  md = (tmp_path / "out" / "results.md").read_text()
  assert "PARTIAL" in md and "run me" in md
  assert (tmp_path / "out" / "curve.png").exists()

"""Tests for inhernet_jax.models.sizes: the one reader of sizes by name, and the numbers it hands on
(`accounting.budget_params`). Cheap: NumPy params, zoo models only through their shapes."""


import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

import inhernet_jax
from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.models import sizes


def net():
  """Two dense layers, 220 + 105 = 325 parameters."""
  return {"l0": {"kernel": np.zeros((10, 20), np.float32), "bias": np.zeros(20, np.float32)},
          "l1": {"kernel": np.zeros((20, 5), np.float32), "bias": np.zeros(5, np.float32)}}


def test_numbers():
  params = net()
  assert sizes.parameter_budget(params, 100) == 100
  assert sizes.parameter_budget(params, np.int64(100)) == 100
  assert sizes.parameter_budget(params, "100") == sizes.parameter_budget(params, " 100 ") == 100
  assert sizes.parameter_budget(params, 0.5) == sizes.parameter_budget(params, "0.5") == 162
  assert sizes.parameter_budget(params, 1.0) == 325
  assert sizes.named_size(100) is None and sizes.named_size("0.5") is None


@hypothesis.given(st.floats(min_value=1e-6, max_value=1.0))
def test_a_fraction_is_that_share_of_the_teacher_rounded_down(fraction):
  got = sizes.parameter_budget(net(), fraction)
  assert got == accounting.budget_params(net(), fraction) == int(np.floor(fraction * 325))
  assert 0 <= got <= 325


def test_student_is_a_zoo_models_size():
  params = net()
  assert sizes.parameter_budget(params, "student:mlp") == models.param_count("mlp", num_classes=10)
  got = sizes.parameter_budget(params, "student:cnn", num_classes=3,
                               model_kwargs={"widths": (4, 8, 16)})
  assert got == models.param_count("cnn", num_classes=3, widths=(4, 8, 16))
  assert sizes.named_size(" student: mlp ") == models.param_count("mlp")


def test_params_is_another_methods_size():
  methods = {"student": 1234, "small": 99}
  assert sizes.named_size("params:student", methods=methods) == 1234
  assert sizes.parameter_budget(net(), "params:small", methods=methods) == 99
  # Where methods are known, "params:" means a method only, even one named like a zoo model.
  assert sizes.named_size("params:mlp", methods={"mlp": 7}) == 7
  with pytest.raises(ValueError, match=r"where 'params:mlp': unknown method 'mlp'.*"
                     r"known: small, student"):
    sizes.named_size("params:mlp", methods=methods, where="where")
  with pytest.raises(ValueError, match="known: none"):
    sizes.named_size("params:student", methods={})


def test_params_names_a_method_only():
  with pytest.raises(ValueError, match="'params:<method>' is the size of another method.*"
                     "write 'student:<zoo model>'"):
    sizes.parameter_budget(net(), "params:mlp")


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, "budget 0: a parameter count must be >= 1"),
    (-5, ValueError, ">= 1"),
    (1.5, ValueError, r"fraction of the teacher's 325 parameters"),
    (0.0, ValueError, r"in \(0, 1\]"),
    (float("nan"), ValueError, r"in \(0, 1\]"),
    (True, TypeError, "got bool True"),
    (None, TypeError, "got NoneType"),
    ("student:nope", ValueError, "budget 'student:nope': unknown model 'nope'; known: .*resnet"),
    ("teacher:cnn", ValueError, "budget 'teacher:cnn': expected .*'student:<zoo model>' or "
                                "'params:<method>'"),
    ("lots", ValueError, "budget 'lots': expected an int"),
    ("params:nope", ValueError, "budget 'params:nope': 'params:<method>' is the size of another "
                                "method.*none is known here.*'student:<zoo model>'"),
])
def test_bad_sizes_name_the_value_and_what_was_expected(value, error, match):
  with pytest.raises(error, match=match):
    sizes.parameter_budget(net(), value)


@hypothesis.given(st.text(min_size=1, max_size=12))
def test_any_string_is_a_count_or_an_error_naming_it(text):
  try:
    got = sizes.parameter_budget(net(), text, methods={"student": 5})
  except (TypeError, ValueError) as e:
    assert repr(text) in str(e)
  else:
    assert isinstance(got, int) and got >= 0


def test_the_package_exports_the_resolver():
  assert inhernet_jax.parameter_budget is sizes.parameter_budget
  assert "parameter_budget" in inhernet_jax.__all__ and "sizes" in inhernet_jax.__all__


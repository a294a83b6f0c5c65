"""inhernet_jax.data.sources: the pieces every dataset builder shares, below `data`."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from inhernet_jax.data import pipeline as data
from inhernet_jax.data import sources

ROOT = pathlib.Path(__file__).parents[1]


def test_arrays_index_rows_of_every_array():
  rows = sources.Arrays({"image": np.arange(6).reshape(3, 2), "label": np.array([7, 8, 9])})
  assert len(rows) == 3
  np.testing.assert_array_equal(rows[1]["image"], [2, 3])
  assert rows[2]["label"] == 9


def test_config_ints_and_augment_name_the_field():
  assert sources.get_int({}, "pad", 2, low=0) == 2
  assert sources.get_int({"pad": 3}, "pad", 2, low=0) == 3
  with pytest.raises(TypeError, match="data config: pad must be an int, got True"):
    sources.get_int({"pad": True}, "pad", 2, low=0)
  with pytest.raises(ValueError, match="data config: pad must be >= 0, got -1"):
    sources.get_int({"pad": -1}, "pad", 2, low=0)
  assert sources.get_augment({}, "digits", supported=False) is False
  with pytest.raises(ValueError, match="augment=True is not supported for digits"):
    sources.get_augment({"augment": True}, "digits", supported=False)


def test_data_re_exports_them_under_the_old_names():
  assert data.Task is sources.Task and data.DatasetNotPreparedError is sources.DatasetNotPreparedError
  assert data._Spec is sources.DatasetSpec and data._Arrays is sources.Arrays
  assert data.tfds_source is sources.tfds_source


def test_a_builder_module_needs_no_data_module():
  code = ("import sys\nfrom inhernet_jax.data import fashion_mnist\n"
          "assert 'inhernet_jax.data.pipeline' not in sys.modules, 'fashion_mnist imports data'\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

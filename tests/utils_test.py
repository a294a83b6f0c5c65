"""inhernet_jax.common.utils: atomic files, JSON conversion, tree-path names."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from inhernet_jax.common import utils


def test_writes_bytes_and_text_and_replaces(tmp_path):
  path = tmp_path / "f.json"
  utils.atomic_write(path, lambda f: f.write(b"old"))
  utils.atomic_write(str(path), lambda f: f.write("néw"), "w")
  assert path.read_text(encoding="utf-8") == "néw"
  assert os.listdir(tmp_path) == ["f.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
  path = tmp_path / "f.bin"
  path.write_bytes(b"old")

  def boom(f):
    f.write(b"partial")
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    utils.atomic_write(path, boom)
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["f.bin"]


def test_jsonable_converts_numpy_jax_tuples_and_keys():
  got = utils.jsonable({"a": (np.float32(0.5), np.int64(3)), 1: jnp.arange(2),
                        "m": np.eye(2, dtype=np.float32), "n": None, "nan": float("nan")})
  assert got["a"] == [0.5, 3] and type(got["a"][1]) is int
  assert got["1"] == [0, 1] and got["m"] == [[1.0, 0.0], [0.0, 1.0]] and got["n"] is None
  assert math.isnan(got["nan"])
  json.dumps(got)  # Plain Python all the way down.


def test_jsonable_names_the_offending_path():
  with pytest.raises(TypeError, match=r"runs\[0\]\['f'\]: object is not JSON-serialisable"):
    utils.jsonable([{"f": object()}], "runs")


def test_write_json_is_atomic_and_plain(tmp_path):
  path = tmp_path / "r.json"
  utils.write_json(path, {"x": np.float64(2.0), "t": (1, 2)}, indent=2)
  assert json.loads(path.read_text()) == {"x": 2.0, "t": [1, 2]}
  with pytest.raises(TypeError, match="r.json\\['bad'\\]"):
    utils.write_json(path, {"bad": object()})
  assert json.loads(path.read_text()) == {"x": 2.0, "t": [1, 2]}  # Untouched.
  assert os.listdir(tmp_path) == ["r.json"]


class _Box:  # An attribute on a path (a flax struct or optax state) reads as its name.
  def __init__(self, w):
    self.w = w


def test_path_names_of_dicts_lists_and_attributes():
  import jax

  jax.tree_util.register_pytree_with_keys(
      _Box, lambda b: (((jax.tree_util.GetAttrKey("w"), b.w),), None), lambda _, c: _Box(*c))
  tree = {"b": [np.zeros(1), _Box(np.ones(2))], "a": {"kernel": np.zeros((2, 3))}}
  names = utils.flatten_with_names(tree)
  assert [n for n, _ in names] == ["a/kernel", "b/0", "b/1/w"]
  assert names[0][1].shape == (2, 3)
  shapes = utils.map_with_names(lambda n, x, y: f"{n}:{x.size + y.size}", tree, tree)
  assert shapes["a"]["kernel"] == "a/kernel:12" and shapes["b"][1].w == "b/1/w:4"

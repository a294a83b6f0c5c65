"""inhernet_jax.files: a file is replaced whole or left as it was."""

import os

import pytest

from inhernet_jax import files


def test_writes_bytes_and_text_and_replaces(tmp_path):
  path = tmp_path / "f.json"
  files.atomic_write(path, lambda f: f.write(b"old"))
  files.atomic_write(str(path), lambda f: f.write("néw"), "w")
  assert path.read_text(encoding="utf-8") == "néw"
  assert os.listdir(tmp_path) == ["f.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
  path = tmp_path / "f.bin"
  path.write_bytes(b"old")

  def boom(f):
    f.write(b"partial")
    raise RuntimeError("killed")

  with pytest.raises(RuntimeError, match="killed"):
    files.atomic_write(path, boom)
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["f.bin"]

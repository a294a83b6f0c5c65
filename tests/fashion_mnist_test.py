"""Tests for `inhernet_jax.data.fashion_mnist`: IDX files the test writes itself, TFDS mocked."""

import gzip
import hashlib
import os
import struct

import ml_collections
import numpy as np
import pytest

from inhernet_jax.data import pipeline as data
from inhernet_jax.data import fashion_mnist


def write_idx(path, array):
  """The IDX format written by hand: 0, 0, type byte (0x08 uint8), ndim, big-endian
  int32 dims, bytes (independent of `fashion_mnist.write_idx`)."""
  array = np.ascontiguousarray(array, np.uint8)
  raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  raw += struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(raw)


def make_dir(tmp_path, n_train=20, n_test=7, gz=True, seed=0):
  return fashion_mnist.write_fake(str(tmp_path), n_train, n_test, seed=seed, gz=gz)


def cfg(tmp_path, **fields):
  return ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": str(tmp_path), **fields})


def normalised(images):
  """(pixels / 255 - mean) / std in float32, Fashion-MNIST's training statistics."""
  x = np.asarray(images[..., None], np.float32) / np.float32(255)
  return (x - np.float32(0.2860)) / np.float32(0.3530)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("writer", [write_idx, fashion_mnist.write_idx])
def test_read_idx_round_trip(tmp_path, gz, writer):
  a = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
  path = str(tmp_path / ("x.idx" + (".gz" if gz else "")))
  writer(path, a)
  got = fashion_mnist.read_idx(path)
  assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
  np.testing.assert_array_equal(got, a)


def test_read_idx_rejects_bad_files(tmp_path):
  bad = tmp_path / "bad"
  bad.write_bytes(b"\x01\x02\x08\x01")
  with pytest.raises(ValueError, match="not an IDX file"):
    fashion_mnist.read_idx(str(bad))
  short = tmp_path / "short"
  short.write_bytes(struct.pack(">BBBBi", 0, 0, 8, 1, 10) + b"\x00" * 9)
  with pytest.raises(ValueError, match=r"header says \(10,\).*holds 9 bytes"):
    fashion_mnist.read_idx(str(short))


@pytest.mark.parametrize("gz", [True, False])
def test_eval_batches_are_the_test_images_in_order(tmp_path, gz):
  sets = make_dir(tmp_path, gz=gz)
  p = data.get(cfg(tmp_path), batch_size=4, seed=0, eval_batch_size=4)
  assert p.task == data.Task("fashion_mnist", "classification", 10, (28, 28, 1), "float32", 20, 7)
  batches = list(p.eval_batches())
  x = np.concatenate([b["input"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.tolist() == [1] * 7 + [0]
  np.testing.assert_allclose(x[:7], normalised(sets["test"][0]), rtol=1e-6)
  assert np.concatenate([b["label"] for b in batches])[:7].tolist() == sets["test"][1].tolist()
  assert data.input_shape(cfg(tmp_path)) == (28, 28, 1) and data.num_classes(cfg(tmp_path)) == 10


def test_info_records_the_files_sha256(tmp_path):
  make_dir(tmp_path)
  info = data.get(cfg(tmp_path), batch_size=4, seed=0).info
  assert info["source"] == "idx" and info["data_dir"] == str(tmp_path)
  assert sorted(info["sha256"]) == sorted(s + ".gz" for s in fashion_mnist.FILES.values())
  for name, digest in info["sha256"].items():
    assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()


def test_without_augmentation_train_batches_are_the_train_images(tmp_path):
  sets = make_dir(tmp_path)
  p = data.get(cfg(tmp_path, augment=False), batch_size=5, seed=3)
  x = np.concatenate([p.train_batch(s)["input"] for s in range(4)])  # One epoch.
  want = normalised(sets["train"][0])
  assert sorted(r.tobytes() for r in x) == sorted(r.tobytes() for r in want)


@pytest.mark.parametrize("flip", [True, False])
def test_augmentation_is_a_padded_crop_with_optional_flip(tmp_path, flip):
  make_dir(tmp_path)
  plain = data.get(cfg(tmp_path, augment=False), batch_size=20, seed=1).train_batch(0)
  aug = data.get(cfg(tmp_path, pad=3, flip=flip), batch_size=20, seed=1).train_batch(0)
  assert plain["label"].tolist() == aug["label"].tolist()  # Same order, same seed.
  zero = normalised(np.zeros((1, 1)))[0, 0, 0]
  flipped_any = moved_any = False
  for a, b in zip(plain["input"][..., 0], aug["input"][..., 0]):
    padded = np.pad(a, 3, constant_values=zero)
    hits = [(dy, dx, f) for dy in range(7) for dx in range(7) for f in (False, True)
            if np.array_equal(b, (lambda c: c[:, ::-1] if f else c)(padded[dy:dy + 28, dx:dx + 28]))]
    assert hits, "not a crop of the padded image"
    flipped_any |= all(f for *_, f in hits)
    moved_any |= all((dy, dx) != (3, 3) for dy, dx, _ in hits)
    if not flip:
      assert any(not f for *_, f in hits)
  assert moved_any and flipped_any == flip


def test_train_examples_keeps_the_first_images(tmp_path):
  sets = make_dir(tmp_path)
  p = data.get(cfg(tmp_path, augment=False, train_examples=8), batch_size=4, seed=0)
  assert p.task.train_size == 8 and p.task.eval_size == 7 and p.info["train_examples"] == 8
  x = np.concatenate([p.train_batch(s)["input"] for s in range(2)])
  assert sorted(r.tobytes() for r in x) == sorted(
      r.tobytes() for r in normalised(sets["train"][0][:8]))


@pytest.mark.parametrize("fields, error, match", [
    (dict(flip="yes"), TypeError, "flip must be a bool"),
    (dict(pad=-1), ValueError, "pad must be >= 0"),
    (dict(train_examples=0), ValueError, "train_examples must be >= 1"),
])
def test_bad_fields_are_named(tmp_path, fields, error, match):
  make_dir(tmp_path)
  with pytest.raises(error, match=match):
    data.get(cfg(tmp_path, **fields), batch_size=4, seed=0)


def test_bad_labels_are_named(tmp_path):
  make_dir(tmp_path)
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(7, 12))
  with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*t10k-labels"):
    data.get(cfg(tmp_path), batch_size=4, seed=0)


def test_neither_source_is_one_error_naming_both_ways(tmp_path):
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")  # Only some files.
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.get(cfg(tmp_path), batch_size=4, seed=0)
  msg = str(e.value)
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "tfds build fashion_mnist" in msg and str(tmp_path) in msg
  assert "t10k-labels-idx1-ubyte" in msg


def test_tfds_is_used_without_idx_files(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=12):
    p = data.get(cfg(tmp_path), batch_size=4, seed=0)
    assert p.info["source"] == "tfds"
    b = p.train_batch(0)
  assert b["input"].shape == (4, 28, 28, 1) and b["input"].dtype == np.float32


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_the_debian_package_is_the_default():
  p = data.get(ml_collections.ConfigDict({"name": "fashion_mnist"}), batch_size=100, seed=0)
  assert (p.task.train_size, p.task.eval_size) == (60000, 10000)
  assert p.info["data_dir"] == fashion_mnist.DEBIAN_DIR
  counts = np.bincount(np.concatenate([b["label"] for b in p.eval_batches()]), minlength=10)
  assert counts.tolist() == [1000] * 10  # The test set is balanced.

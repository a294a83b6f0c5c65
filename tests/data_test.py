"""Tests for `inhernet_jax.data.pipeline`: one pipeline interface over digits, chars and TFDS.

The TFDS image path runs for real on `tfds.testing.mock_data`, which works without
TensorFlow: it patches the ArrayRecord data source that `tfds.data_source` returns with
deterministic random examples, so everything downstream (grain, augmentation,
normalisation, batching, sharding) is the code a prepared dataset goes through.
"""

import collections
import hashlib
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from inhernet_jax.data import pipeline as data

ROOT = pathlib.Path(__file__).parents[1]


def cfg(**fields):
  return ml_collections.ConfigDict(fields)


def concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def rows(x):
  """A multiset of the rows of ``x`` (exact bytes)."""
  return collections.Counter(r.tobytes() for r in np.ascontiguousarray(x))


def same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in ("input", "label", "mask"))


@pytest.fixture(scope="module")
def digits_sets():
  return data.digits()


@pytest.fixture(scope="module")
def digits_pipe():
  return data.get(cfg(name="digits"), batch_size=64, seed=0)


@pytest.fixture(scope="module")
def corpus():
  return data.load_corpus()


# --------------------------------------------------------------------- config errors
def test_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="name must be one of") as e:
    data.get(cfg(name="mnist"), batch_size=8, seed=0)
  for name in ("digits", "chars", "cifar10", "cifar100", "imagenet2012"):
    assert name in str(e.value)


def test_unknown_field_is_named():
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['seqlen'\]"):
    data.get(cfg(name="chars", seqlen=64), batch_size=8, seed=0)


@pytest.mark.parametrize("fields, kwargs, error, match", [
    (dict(name="chars", seq_len=0), {}, ValueError, "seq_len must be >= 1"),
    (dict(name="chars", seq_len="64"), {}, TypeError, "seq_len must be an int"),
    (dict(name="chars", seq_len=10**9), {}, ValueError, "seq_len=1000000000 is too long"),
    (dict(name="chars", eval_windows=0), {}, ValueError, "eval_windows must be >= 1"),
    (dict(name="chars", augment=True), {}, ValueError, "augment=True is not supported"),
    (dict(name="digits", augment="yes"), {}, TypeError, "augment must be a bool"),
    (dict(name="digits", test_fraction=1.5), {}, ValueError, "test_fraction must be"),
    (dict(name="digits", test_fraction=0.001), {}, ValueError, "test_fraction=0.001"),
    (dict(name="digits", split_seed=-1), {}, ValueError, "split_seed must be >= 0"),
    (dict(name="digits"), dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(name="digits"), dict(batch_size=5000), ValueError,
     "larger than the 1437 training examples of digits"),
    (dict(name="digits"), dict(seed=-3), ValueError, "seed must be >= 0"),
    (dict(name="digits"), dict(seed=1.0), TypeError, "seed must be an int"),
    (dict(name="digits"), dict(batch_size=30, process_count=4), ValueError,
     "batch_size=30 must be divisible by process_count=4"),
    (dict(name="digits"), dict(eval_batch_size=30, process_count=4, batch_size=32),
     ValueError, "eval_batch_size=30 must be divisible"),
    (dict(name="digits"), dict(process_index=2, process_count=2), ValueError,
     r"process_index must be in \[0, process_count=2\)"),
])
def test_bad_values_name_the_field(fields, kwargs, error, match):
  kwargs = {"batch_size": 8, "seed": 0, **kwargs}
  with pytest.raises(error, match=match):
    data.get(cfg(**fields), **kwargs)


def test_train_batch_rejects_a_negative_step(digits_pipe):
  with pytest.raises(ValueError, match="step must be >= 0"):
    digits_pipe.train_batch(-1)


def test_plain_mappings_and_attribute_objects_work():
  import types

  a = data.get({"name": "digits"}, batch_size=32, seed=1).train_batch(3)
  b = data.get(types.SimpleNamespace(name="digits"), batch_size=32, seed=1).train_batch(3)
  assert same(a, b)


# ------------------------------------------------------------------------- digits
def test_digits_task_shapes_and_dtypes(digits_pipe):
  p = digits_pipe
  assert p.task == data.Task("digits", "classification", 10, (8, 8, 1), "float32", 1437, 360)
  assert p.steps_per_epoch == 1437 // 64
  b = p.train_batch(0)
  assert set(b) == {"input", "label", "mask"}
  assert b["input"].shape == (64, 8, 8, 1) and b["input"].dtype == np.float32
  assert b["label"].shape == (64,) and b["label"].dtype == np.int32
  assert b["mask"].dtype == np.float32 and np.all(b["mask"] == 1)
  assert 0.0 <= b["input"].min() and b["input"].max() <= 1.0
  assert set(np.unique(b["label"])) <= set(range(10))


def test_digits_split_is_fixed_and_stratified(digits_sets):
  train, test = digits_sets
  assert len(train["label"]) == 1437 and len(test["label"]) == 360
  assert np.all(np.bincount(test["label"]) >= 35)  # Every class ~36 times.
  again = data.digits()
  assert np.array_equal(again[1]["image"], test["image"])
  other = data.digits(seed=1)
  assert not np.array_equal(other[1]["image"], test["image"])


def test_train_batch_is_a_pure_function_of_seed_and_step(digits_pipe):
  fresh = data.get(cfg(name="digits"), batch_size=64, seed=0)
  for step in (0, 7, 21, 22, 100):  # 22 starts epoch 1.
    assert same(digits_pipe.train_batch(step), fresh.train_batch(step))
  # Out of order and repeated calls change nothing.
  assert same(fresh.train_batch(7), digits_pipe.train_batch(7))
  assert not np.array_equal(fresh.train_batch(0)["input"], fresh.train_batch(1)["input"])
  other = data.get(cfg(name="digits"), batch_size=64, seed=1)
  assert not np.array_equal(other.train_batch(0)["input"], fresh.train_batch(0)["input"])


def test_each_epoch_is_a_new_permutation_of_the_train_set(digits_sets):
  train, _ = digits_sets
  p = data.get(cfg(name="digits"), batch_size=479, seed=3)  # 1437 = 3 * 479: no remainder.
  assert p.steps_per_epoch == 3
  epochs = [concat([p.train_batch(e * 3 + s) for s in range(3)]) for e in range(2)]
  for ep in epochs:
    assert rows(ep["input"]) == rows(train["image"])
    assert collections.Counter(ep["label"].tolist()) == collections.Counter(
        train["label"].tolist())
  assert not np.array_equal(epochs[0]["input"], epochs[1]["input"])


def test_an_epoch_with_a_remainder_repeats_no_example(digits_sets, digits_pipe):
  train, _ = digits_sets
  p = digits_pipe
  for e in (0, 1):
    ep = concat([p.train_batch(e * p.steps_per_epoch + s) for s in range(p.steps_per_epoch)])
    assert len(ep["label"]) == 22 * 64
    assert not rows(ep["input"]) - rows(train["image"])  # A sub-multiset of the train set.


def test_eval_covers_every_example_once_with_a_padding_mask(digits_sets):
  _, test = digits_sets
  p = data.get(cfg(name="digits"), batch_size=64, seed=0, eval_batch_size=50)
  batches = list(p.eval_batches())
  assert len(batches) == p.num_eval_batches == 8  # ceil(360 / 50)
  assert all(b["input"].shape == (50, 8, 8, 1) for b in batches)
  ev = concat(batches)
  assert ev["mask"].tolist() == [1.0] * 360 + [0.0] * 40
  real = ev["mask"] == 1
  # In the source's order: the same every time.
  np.testing.assert_array_equal(ev["input"][real], test["image"])
  np.testing.assert_array_equal(ev["label"][real], test["label"])
  assert same(ev, concat(list(p.eval_batches())))


@pytest.mark.parametrize("count", [2, 4])
def test_process_shares_split_the_global_batches(count):
  glob = data.get(cfg(name="digits"), batch_size=64, seed=5, eval_batch_size=48)
  shares = [data.get(cfg(name="digits"), batch_size=64, seed=5, eval_batch_size=48,
                     process_index=i, process_count=count) for i in range(count)]
  assert shares[0].steps_per_epoch == glob.steps_per_epoch
  for step in (0, 21, 23):
    parts = [s.train_batch(step) for s in shares]
    assert all(len(b["label"]) == 64 // count for b in parts)
    assert same(concat(parts), glob.train_batch(step))
  local = [list(s.eval_batches()) for s in shares]
  assert all(len(x) == glob.num_eval_batches for x in local)  # Same step count everywhere.
  for k, g in enumerate(glob.eval_batches()):
    assert same(concat([x[k] for x in local]), g)


# -------------------------------------------------------------------------- chars
def test_corpus_is_deterministic_ascii_and_split_per_file(corpus):
  assert corpus.files == data.CHARS_FILES and 30 <= len(corpus.files) <= 60
  total = sum(corpus.file_chars)
  assert 1_500_000 <= total <= 3_000_000
  assert corpus.train.size + corpus.valid.size == total
  assert corpus.valid.size == sum(int(n * 0.1) for n in corpus.file_chars)
  assert corpus.train.dtype == np.uint8 and corpus.train.max() < 128
  assert not corpus.train.flags.writeable
  # Re-read from disk (no cache): the same text, the same hash.
  data.load_corpus.cache_clear()
  again = data.load_corpus()
  assert again is not corpus and again.sha256 == corpus.sha256
  assert np.array_equal(again.train, corpus.train)
  root = pathlib.Path(corpus.stdlib_dir)
  digest = hashlib.sha256()
  for f in corpus.files:
    digest.update((root / f).read_text(encoding="utf-8").encode("utf-8"))
  assert digest.hexdigest() == corpus.sha256
  # The first file's training text starts the training ids.
  head = (root / corpus.files[0]).read_text(encoding="utf-8")[:1000]
  np.testing.assert_array_equal(corpus.train[:1000], data.encode(head))
  info = data.corpus_info()
  assert info["sha256"] == corpus.sha256 and info["vocab_size"] == 128
  assert info["train_chars"] == corpus.train.size


def test_non_ascii_characters_map_to_the_reserved_id():
  ids = data.encode("aé\n€~")
  assert ids.tolist() == [97, data.CHARS_UNKNOWN, 10, data.CHARS_UNKNOWN, 126]
  assert data.decode(data.encode("def f(x):\n  return x")) == "def f(x):\n  return x"


def test_missing_corpus_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"argparse\.py is missing"):
    data.load_corpus(str(tmp_path))


def test_chars_batches_are_shifted_windows_of_the_train_text(corpus):
  p = data.get(cfg(name="chars", seq_len=64), batch_size=16, seed=0)
  t = p.task
  assert (t.kind, t.num_classes, t.input_shape, t.input_dtype) == ("lm", 128, (64,), "int32")
  assert t.train_size == corpus.train.size // 64
  assert p.steps_per_epoch == t.train_size // 16
  b = p.train_batch(3)
  assert b["input"].shape == b["label"].shape == b["mask"].shape == (16, 64)
  assert b["input"].dtype == b["label"].dtype == np.int32 and np.all(b["mask"] == 1)
  np.testing.assert_array_equal(b["input"][:, 1:], b["label"][:, :-1])
  text = corpus.train.tobytes()
  for x, y in zip(b["input"], b["label"]):
    window = np.concatenate([x, y[-1:]]).astype(np.uint8).tobytes()
    assert text.find(window) >= 0
  fresh = data.get(cfg(name="chars", seq_len=64), batch_size=16, seed=0)
  assert same(fresh.train_batch(3), b)
  assert not np.array_equal(fresh.train_batch(4)["input"], b["input"])
  other = data.get(cfg(name="chars", seq_len=64), batch_size=16, seed=1)
  assert not np.array_equal(other.train_batch(3)["input"], b["input"])


def test_chars_eval_is_consecutive_valid_windows(corpus):
  p = data.get(cfg(name="chars", seq_len=32, eval_windows=10), batch_size=8, seed=0,
               eval_batch_size=4)
  assert p.task.eval_size == 10
  ev = concat(list(p.eval_batches()))
  assert ev["input"].shape == ev["mask"].shape == (12, 32)
  assert ev["mask"].sum(1).tolist() == [32.0] * 10 + [0.0] * 2
  valid = corpus.valid.astype(np.int32)
  np.testing.assert_array_equal(ev["input"][:10].ravel(), valid[:320])
  np.testing.assert_array_equal(ev["label"][:10].ravel(), valid[1:321])
  full = data.get(cfg(name="chars", seq_len=128), batch_size=8, seed=0)
  assert full.task.eval_size == (corpus.valid.size - 1) // 128


def test_chars_process_shares_split_the_global_batch():
  glob = data.get(cfg(name="chars", seq_len=16), batch_size=8, seed=2)
  parts = [data.get(cfg(name="chars", seq_len=16), batch_size=8, seed=2, process_index=i,
                    process_count=2).train_batch(9) for i in range(2)]
  assert same(concat(parts), glob.train_batch(9))


def test_train_batch_is_the_same_in_a_fresh_process():
  code = ("from inhernet_jax.data import pipeline as data; import hashlib; "
          "p = data.get({'name': 'chars', 'seq_len': 32}, batch_size=8, seed=4); "
          "b = p.train_batch(12345); print(hashlib.sha256(b['input'].tobytes()).hexdigest())")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "123",
                                        "PATH": ""})
  here = data.get(cfg(name="chars", seq_len=32), batch_size=8, seed=4).train_batch(12345)
  assert out.stdout.strip() == hashlib.sha256(here["input"].tobytes()).hexdigest()


# --------------------------------------------------------------------------- tfds
@pytest.mark.parametrize("name, hint", [
    ("cifar100", "tfds build cifar100 --data_dir={d} --file_format=array_record"),
    ("imagenet2012", "{d}/downloads/manual/"),
])
def test_unprepared_tfds_dataset_fails_fast_with_instructions(tmp_path, name, hint):
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.get(cfg(name=name, data_dir=str(tmp_path)), batch_size=8, seed=0)
  assert isinstance(e.value, FileNotFoundError)
  msg = str(e.value)
  assert f"{name} (split 'train') is not prepared" in msg
  assert f"data_dir {tmp_path}" in msg
  assert hint.format(d=tmp_path) in msg
  assert list(tmp_path.iterdir()) == []  # Nothing was downloaded or created.


@pytest.fixture(scope="module")
def mock_tfds():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=24):
    yield tfds


def cifar(tmp, **kwargs):
  fields = {"name": "cifar10", "data_dir": str(tmp), **kwargs.pop("fields", {})}
  return data.get(cfg(**fields), **{"batch_size": 8, "seed": 0, **kwargs})


def test_cifar_pipeline_on_mocked_tfds(mock_tfds, tmp_path):
  p = cifar(tmp_path)
  assert p.task == data.Task("cifar10", "classification", 10, (32, 32, 3), "float32", 24, 24)
  assert p.info["augment"] is True
  b = p.train_batch(0)
  assert b["input"].shape == (8, 32, 32, 3) and b["input"].dtype == np.float32
  assert b["label"].dtype == np.int32 and set(b["label"].tolist()) <= set(range(10))
  assert np.all(b["mask"] == 1)
  lo = (0 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  hi = (1 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
  assert np.all(b["input"] >= lo - 1e-5) and np.all(b["input"] <= hi + 1e-5)
  # Pure in (seed, step); the steps, seeds and epochs differ.
  again = cifar(tmp_path)
  for step in (0, 4):
    assert same(again.train_batch(step), p.train_batch(step))
  assert not np.array_equal(p.train_batch(1)["input"], p.train_batch(0)["input"])
  assert not np.array_equal(cifar(tmp_path, seed=1).train_batch(0)["input"], b["input"])


def test_cifar_eval_is_normalised_source_images_in_order(mock_tfds, tmp_path):
  p = cifar(tmp_path, eval_batch_size=10)
  raw = mock_tfds.data_source("cifar10", split="test", download=False)
  ev = concat(list(p.eval_batches()))
  assert ev["mask"].tolist() == [1.0] * 24 + [0.0] * 6
  want = np.stack([data.normalize(raw[i]["image"], data.CIFAR10_MEAN, data.CIFAR10_STD)
                   for i in range(24)])
  np.testing.assert_array_equal(ev["input"][:24], want)
  assert ev["label"][:24].tolist() == [int(raw[i]["label"]) for i in range(24)]


def crops_and_flips(image, pad=data.CIFAR_PAD):
  """Every pad-crop-flip of a normalised image (black padding normalises to ``lo``)."""
  h, w = image.shape[:2]
  lo = data.normalize(np.zeros((1, 1, 3), np.uint8), data.CIFAR10_MEAN, data.CIFAR10_STD)
  padded = np.tile(lo, (h + 2 * pad, w + 2 * pad, 1))
  padded[pad: pad + h, pad: pad + w] = image
  for dy in range(2 * pad + 1):
    for dx in range(2 * pad + 1):
      crop = padded[dy: dy + h, dx: dx + w]
      yield (dy, dx, False), crop
      yield (dy, dx, True), crop[:, ::-1]


def test_cifar_augmentation_is_a_pad_crop_flip_of_the_plain_image(mock_tfds, tmp_path):
  aug = cifar(tmp_path, seed=7)
  plain = cifar(tmp_path, seed=7, fields={"augment": False})
  assert plain.info["augment"] is False
  a, b = concat([aug.train_batch(s) for s in range(3)]), concat(
      [plain.train_batch(s) for s in range(3)])
  assert a["label"].tolist() == b["label"].tolist()  # Same order: augmentation only.
  changes, flips = 0, set()
  for x, y in zip(a["input"], b["input"]):
    matches = [how for how, c in crops_and_flips(y) if np.array_equal(c, x)]
    assert matches, "not a crop/flip of the unaugmented image"
    changes += (data.CIFAR_PAD, data.CIFAR_PAD, False) not in matches  # Not identity.
    flips.add(matches[0][2])
  assert changes >= 20 and flips == {False, True}


def test_cifar_process_shares_include_the_augmentation(mock_tfds, tmp_path):
  glob = cifar(tmp_path, seed=3)
  parts = [cifar(tmp_path, seed=3, process_index=i, process_count=2).train_batch(5)
           for i in range(2)]
  assert same(concat(parts), glob.train_batch(5))


def test_imagenet_pipeline_on_mocked_tfds(mock_tfds, tmp_path):
  fields = cfg(name="imagenet2012", data_dir=str(tmp_path), image_size=24)
  p = data.get(fields, batch_size=4, seed=0)
  assert p.task.input_shape == (24, 24, 3) and p.task.num_classes == 1000
  b = p.train_batch(2)
  assert b["input"].shape == (4, 24, 24, 3) and b["input"].dtype == np.float32
  assert same(b, data.get(fields, batch_size=4, seed=0).train_batch(2))
  raw = mock_tfds.data_source("imagenet2012", split="validation", download=False)
  ev = next(p.eval_batches())
  want = data.normalize(data.resize_center_crop(raw[0]["image"], 24), data.IMAGENET_MEAN,
                        data.IMAGENET_STD)
  np.testing.assert_array_equal(ev["input"][0], want)


# --------------------------------------------------------------------- transforms
def test_random_resized_crop_and_center_crop():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  outs = [data.random_resized_crop(image, np.random.default_rng(s), 16) for s in range(4)]
  assert all(o.shape == (16, 16, 3) and o.dtype == np.uint8 for o in outs)
  assert not np.array_equal(outs[0], outs[1])
  # A very thin image misses 10 times and falls back to a central crop.
  thin = rng.integers(0, 256, (200, 2, 3), dtype=np.uint8)
  assert data.random_resized_crop(thin, rng, 8).shape == (8, 8, 3)
  const = np.full((50, 80, 3), 77, np.uint8)
  assert np.all(data.resize_center_crop(const, 16) == 77)
  # The center crop keeps the middle: a left/right split image stays split in the middle.
  halves = np.zeros((64, 64, 3), np.uint8)
  halves[:, 32:] = 255
  out = data.resize_center_crop(halves, 56, resize=64)
  assert out[:, :20].max() == 0 and out[:, 36:].min() == 255


# ------------------------------------------------------------- multi-process shares
# Every process reads a disjoint slice of every global batch from one globally shuffled
# stream, so the batches do not depend on the process count (a run resumed on another
# number of hosts sees the same data). Checked on every dataset: the mocked TFDS ones
# with 20 examples per split (batch 8: 2 steps and a dropped remainder of 4; eval batch
# 8: 3 batches, 4 of them padding), digits, and a few short chars windows.
N_MOCK = 20
TFDS_NAMES = ("cifar10", "cifar100", "imagenet2012")
SHARE_CASES = [(n, c) for n in (*TFDS_NAMES, "digits", "chars") for c in (2, 4)]


@pytest.fixture
def mock_tfds_20():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=N_MOCK):  # Nests inside `mock_tfds`.
    yield tfds


def share_setup(name, tmp):
  """``(fields, get kwargs)`` of a small pipeline of ``name``."""
  if name in TFDS_NAMES:
    fields = {"name": name, "data_dir": str(tmp)}
    if name == "imagenet2012":
      fields["image_size"] = 16
    return fields, {"batch_size": 8, "eval_batch_size": 8}
  if name == "digits":
    return {"name": name}, {"batch_size": 96, "eval_batch_size": 64}  # 14 steps, 6 batches.
  return ({"name": "chars", "seq_len": 16, "train_windows": 44, "eval_windows": 10},
          {"batch_size": 8, "eval_batch_size": 4})


def example_key(batch, i):
  """One example of a batch (input and label) as bytes: its identity."""
  return batch["input"][i].tobytes() + batch["label"][i].tobytes()


def source_keys(name, fields, tfds_mod):
  """``(train, eval)``: the key of every source example, in source order.

  What the pipeline makes of source example ``i`` without augmentation, computed here
  from the raw source; None where examples have no fixed content (chars training
  windows start at random).
  """
  if name in TFDS_NAMES:
    train_split, eval_split, _, mean, std = data._TFDS[name]

    def keys(split):
      raw = tfds_mod.data_source(name, split=split, download=False)
      out = []
      for i in range(len(raw)):
        image = raw[i]["image"]
        if name == "imagenet2012":
          image = data.resize_center_crop(image, fields["image_size"])
        out.append(data.normalize(image, mean, std).tobytes()
                   + np.int32(raw[i]["label"]).tobytes())
      return out

    return keys(train_split), keys(eval_split)
  if name == "digits":
    train, test = data.digits()
    return ([x.tobytes() + y.tobytes() for x, y in zip(train["image"], train["label"])],
            [x.tobytes() + y.tobytes() for x, y in zip(test["image"], test["label"])])
  valid = data.load_corpus().valid.astype(np.int32)
  seq = fields["seq_len"]
  return None, [valid[i * seq: (i + 1) * seq].tobytes() + valid[i * seq + 1: (i + 1) * seq + 1]
                .tobytes() for i in range(fields["eval_windows"])]


def pipelines(fields, kwargs, count, seed=11):
  """The single-process pipeline and the ``count`` process shares of the same data."""
  glob = data.get(cfg(**fields), seed=seed, **kwargs)
  shares = [data.get(cfg(**fields), seed=seed, process_index=i, process_count=count,
                     **kwargs) for i in range(count)]
  return glob, shares


@pytest.mark.parametrize("name, count", SHARE_CASES)
def test_train_shares_of_an_epoch_are_disjoint_and_cover_it(name, count, mock_tfds_20,
                                                            tmp_path):
  fields, kwargs = share_setup(name, tmp_path)
  train_keys, _ = source_keys(name, fields, mock_tfds_20)
  if name in TFDS_NAMES:
    fields = {**fields, "augment": False}  # Examples keep their source content.
  glob, shares = pipelines(fields, kwargs, count)
  spe, size = glob.steps_per_epoch, glob.batch_size
  assert spe >= 2 and glob.task.train_size > spe * size  # An epoch drops a remainder.
  assert all(s.steps_per_epoch == spe and s.local_batch_size == size // count
             for s in shares)
  ids = None
  if train_keys is not None:
    ids = {k: i for i, k in enumerate(train_keys)}
    assert len(ids) == glob.task.train_size  # Distinct: a key names one source example.
  for epoch in (0, 1):
    per_process = [collections.Counter() for _ in shares]
    whole = collections.Counter()
    for step in range(epoch * spe, (epoch + 1) * spe):
      parts = [s.train_batch(step) for s in shares]
      g = glob.train_batch(step)
      assert all(len(p["label"]) == size // count for p in parts)
      assert same(concat(parts), g)  # The shares are the global batch, in process order.
      if ids is None:
        continue
      for seen, p in zip(per_process, parts):
        seen.update(ids[example_key(p, i)] for i in range(len(p["label"])))
      whole.update(ids[example_key(g, i)] for i in range(size))
    if ids is None:
      continue
    # Each source example at most once in the epoch's global batches ...
    assert sum(whole.values()) == spe * size and max(whole.values()) == 1
    # ... and the process shares are pairwise disjoint and together are exactly those.
    for i in range(count):
      for j in range(i + 1, count):
        assert not set(per_process[i]) & set(per_process[j])
    assert sum(per_process, collections.Counter()) == whole


@pytest.mark.parametrize("name, count", SHARE_CASES)
def test_augmented_shares_are_the_global_batch(name, count, mock_tfds_20, tmp_path):
  # Augmentation draws from the stream position, so it is process-count independent.
  fields, kwargs = share_setup(name, tmp_path)
  glob, shares = pipelines(fields, kwargs, count, seed=5)
  for step in (0, glob.steps_per_epoch - 1, glob.steps_per_epoch, 7 * glob.steps_per_epoch + 1):
    assert same(concat([s.train_batch(step) for s in shares]), glob.train_batch(step))


@pytest.mark.parametrize("name, count", SHARE_CASES)
def test_eval_shares_cover_the_eval_split_once(name, count, mock_tfds_20, tmp_path):
  fields, kwargs = share_setup(name, tmp_path)
  _, eval_keys = source_keys(name, fields, mock_tfds_20)
  glob, shares = pipelines(fields, kwargs, count)
  n, batches = glob.task.eval_size, glob.num_eval_batches
  assert n == len(eval_keys) and batches * glob.eval_batch_size > n  # Some padding.
  local = [list(s.eval_batches()) for s in shares]
  assert all(s.num_eval_batches == batches and len(x) == batches  # Same count everywhere.
             for s, x in zip(shares, local))
  valid, padding = collections.Counter(), 0
  for k, g in enumerate(glob.eval_batches()):
    assert same(concat([x[k] for x in local]), g)
    for b in (x[k] for x in local):
      assert len(b["label"]) == glob.eval_batch_size // count
      rows = b["mask"].reshape(len(b["mask"]), -1)
      assert np.all(rows == rows[:, :1])  # A window is all real or all padding.
      for i, real in enumerate(rows[:, 0]):
        if real:
          valid[example_key(b, i)] += 1
        else:
          padding += 1
  assert valid == collections.Counter(eval_keys)  # Every eval example, as often as it is.
  assert padding == batches * glob.eval_batch_size - n


@pytest.mark.parametrize("name", (*TFDS_NAMES, "digits", "chars"))
def test_shares_are_pure_in_seed_and_step(name, mock_tfds_20, tmp_path):
  fields, kwargs = share_setup(name, tmp_path)
  count = 4
  _, used = pipelines(fields, kwargs, count, seed=9)
  spe = used[0].steps_per_epoch
  resume = 3 * spe + 1  # A step of epoch 3, as a resumed run would ask first.
  history = [s.train_batch(t) for s in used for t in range(spe + 1)]  # Read before.
  assert history
  want = [s.train_batch(resume) for s in used]
  # A fresh object asked for the resumed step first, ...
  _, fresh = pipelines(fields, kwargs, count, seed=9)
  assert all(same(f.train_batch(resume), w) for f, w in zip(fresh, want))
  # ... or after other steps in a scrambled order and repeats: the same shares.
  _, scrambled = pipelines(fields, kwargs, count, seed=9)
  for t in (5 * spe, 2, resume + 1, 0, 2):
    for s in reversed(scrambled):
      s.train_batch(t)
  assert all(same(s.train_batch(resume), w) for s, w in zip(scrambled, want))
  # And on 2 processes (or 1) they regroup into the same global batch.
  glob, halves = pipelines(fields, kwargs, 2, seed=9)
  assert same(concat(want), concat([h.train_batch(resume) for h in halves]))
  assert same(concat(want), glob.train_batch(resume))
  other, _ = pipelines(fields, kwargs, 1, seed=10)
  assert not np.array_equal(other.train_batch(resume)["input"], glob.train_batch(resume)["input"])


def test_cifar_share_is_the_same_in_a_fresh_process(mock_tfds_20, tmp_path):
  # Process 1 of 4 resuming at step 9 (augmented), in a new interpreter with another
  # hash seed: the same bytes as here.
  code = ("import hashlib, tensorflow_datasets as tfds; from inhernet_jax.data import pipeline as data\n"
          f"with tfds.testing.mock_data(num_examples={N_MOCK}):\n"
          f"  p = data.get({{'name': 'cifar10', 'data_dir': {str(tmp_path)!r}}}, batch_size=8,"
          " seed=6, process_index=1, process_count=4)\n"
          "  b = p.train_batch(9)\n"
          "print(hashlib.sha256(b['input'].tobytes() + b['label'].tobytes()).hexdigest())")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "7", "PATH": "",
                            "HOME": str(tmp_path)})
  assert out.returncode == 0, out.stderr[-3000:]
  here = cifar(tmp_path, seed=6, process_index=1, process_count=4).train_batch(9)
  assert out.stdout.strip().splitlines()[-1] == hashlib.sha256(
      here["input"].tobytes() + here["label"].tobytes()).hexdigest()

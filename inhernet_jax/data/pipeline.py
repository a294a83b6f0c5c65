"""Input pipelines: one interface for digits, chars, Fashion-MNIST, CIFAR-10/100 and ImageNet.

`get` returns a `Pipeline` whatever the dataset, so a trainer never asks which it got:

* ``train_batch(step)`` is a pure function of ``(seed, step)``: epoch ``step //
  steps_per_epoch`` visits the training set in a permutation drawn from ``(seed,
  epoch)``, and augmentation draws from ``(seed, position in the stream)``. A killed
  run that restarts at step ``k`` in a fresh process sees exactly the batches it would
  have seen. Training batches are always full (the epoch's remainder is dropped).
* ``eval_batches()`` yields every evaluation example once, in a fixed order; the last
  batch is padded to full size with ``mask == 0``, so evaluation compiles once.
* With ``process_count > 1`` each process gets a disjoint slice of every global batch;
  the slices of all processes concatenate to the single-process batch exactly.

Batches are dicts of NumPy arrays: ``"input"`` ``(B, *task.input_shape)``, ``"label"``
int32 ``(B,)`` (classification) or ``(B, seq_len)`` next-token targets (``"lm"``), and
a float32 ``"mask"`` of the label's shape (1 real, 0 padding).

Datasets (``config.name``):

* ``digits`` -- scikit-learn's 8x8 digits in [0, 1], a fixed stratified split.
* ``chars`` -- a character-level corpus of CPython standard-library sources
  (`CHARS_FILES`), ASCII ids (any other character becomes id 0); the last 10% of each
  file is validation. Training windows start anywhere; evaluation windows tile the
  validation text. `corpus_info` identifies the text (it differs between Pythons).
* ``fashion_mnist`` -- Zalando's 28x28 grey clothing images from their IDX files (the
  Debian package ``dataset-fashion-mnist``) or TFDS; pad + random crop and an optional
  flip (``pad``, ``flip``). See `inhernet_jax.data.fashion_mnist`.
* ``cifar10``, ``cifar100``, ``imagenet2012`` -- TFDS random-access (ArrayRecord)
  sources read without TensorFlow, augmented in NumPy (CIFAR: zero-pad 4, random
  crop, flip; ImageNet: random-resized crop, flip; evaluation: ImageNet's resize and
  center crop) and normalised per channel. They must be prepared beforehand: without
  them `get` fails at once with `DatasetNotPreparedError`.

The corpus itself lives in `inhernet_jax.data.corpus`, the image augmentation in
`inhernet_jax.data.images`, and what every builder shares (`Task`, `DatasetSpec`,
`tfds_source`) in `inhernet_jax.data.sources` (all re-exported here). Nothing here touches the network.

Example:
  ```python
  pipe = data.get(ml_collections.ConfigDict({"name": "digits"}), batch_size=64, seed=0)
  for step in range(start_step, num_steps):
    batch = pipe.train_batch(step)     # {"input": (64, 8, 8, 1), "label", "mask"}
  for batch in pipe.eval_batches():    # each test example once; padding has mask 0
    ...
  ```
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from inhernet_jax.data import fashion_mnist
from inhernet_jax.data.corpus import (  # noqa: F401  (re-exported: the chars dataset)
    CHARS_FILES,
    CHARS_UNKNOWN,
    CHARS_VALID_FRACTION,
    CHARS_VOCAB,
    Corpus,
    corpus_info,
    decode,
    encode,
    load_corpus,
)
from inhernet_jax.data.images import (  # noqa: F401  (re-exported: the image datasets)
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_PAD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    pad_crop_flip,
    random_flip,
    random_resized_crop,
    resize_center_crop,
)
from inhernet_jax.data.sources import (  # noqa: F401  (re-exported: the builders' shared pieces)
    Arrays,
    Batch,
    DatasetNotPreparedError,
    DatasetSpec,
    Record,
    Task,
    check_int,
    default_tfds_dir,
    get_augment,
    get_int,
    tfds_source,
)

# This module's older names of the shared pieces.
_Spec, _Arrays, _check_int, _get_int, _get_augment, _default_tfds_dir = (
    DatasetSpec, Arrays, check_int, get_int, get_augment, default_tfds_dir)

KINDS = ("classification", "lm")
# Fields a data config may set; anything else is a typo and is rejected.
FIELDS = ("name", "data_dir", "seq_len", "augment", "image_size", "test_fraction",
          "split_seed", "eval_windows", "train_windows", "pad", "flip",
          "train_examples")


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
  """Deterministic, random-access batches of one dataset for one process.

  Attributes:
    task: the dataset's `Task`.
    batch_size: the global training batch size (all processes together).
    eval_batch_size: the global evaluation batch size.
    steps_per_epoch: ``task.train_size // batch_size``.
    num_eval_batches: batches `eval_batches` yields (the same on every process).
    seed: the seed of the data order and augmentation.
    process_index: this process's share of every batch.
    process_count: processes sharing every batch.
    info: provenance to record with results (split, corpus hash, data_dir, ...).
  """

  task: Task
  batch_size: int
  eval_batch_size: int
  steps_per_epoch: int
  num_eval_batches: int
  seed: int
  process_index: int
  process_count: int
  info: Mapping[str, Any]
  _train: grain.MapDataset = dataclasses.field(repr=False)
  _eval: grain.MapDataset = dataclasses.field(repr=False)

  @property
  def local_batch_size(self) -> int:
    """Training examples per `train_batch` on this process."""
    return self.batch_size // self.process_count

  def train_batch(self, step: int) -> Batch:
    """This process's share of global training batch ``step`` (any step >= 0)."""
    step = _check_int(step, "step", "train_batch", low=0)
    return self._train[step * self.process_count + self.process_index]

  def eval_batches(self) -> Iterator[Batch]:
    """This process's share of every evaluation batch, in a fixed order."""
    for k in range(self.num_eval_batches):
      yield self._eval[k * self.process_count + self.process_index]


# ---------------------------------------------------------------------------- get
def get(config: Any, *, batch_size: int, seed: int, eval_batch_size: int | None = None,
        process_index: int = 0, process_count: int = 1) -> Pipeline:
  """Builds the input pipeline that ``config`` names.

  Args:
    config: an ``ml_collections.ConfigDict``, a mapping or any attribute object with
      ``name`` (one of `NAMES`) and optionally ``data_dir`` (TFDS datasets),
      ``seq_len`` (chars, default 128), ``eval_windows`` (chars: cap on evaluation
      windows, default all), ``train_windows`` (chars: cap on training windows per
      epoch, default about one pass over the train text), ``augment`` (default True for the image datasets'
      training split; digits and chars have none), ``image_size`` (imagenet2012,
      default 224), ``test_fraction`` (digits, default 0.2), ``split_seed``
      (digits, default 0), ``pad`` and ``flip`` (fashion_mnist's augmentation: default
      2 and True) and ``train_examples`` (fashion_mnist: train on the first N
      training images only, for quick CPU runs; default all).
    batch_size: the global training batch size; a multiple of ``process_count``.
    seed: a non-negative int; the data order and augmentation depend on it alone.
    eval_batch_size: the global evaluation batch size (default ``batch_size``); a
      multiple of ``process_count``.
    process_index: this process, in ``[0, process_count)``.
    process_count: processes that share every batch.

  Returns:
    A `Pipeline`.

  Raises:
    ValueError: an unknown dataset name or config field, or a bad value.
    DatasetNotPreparedError: a TFDS dataset is not prepared in its data directory.
    FileNotFoundError: a file of the chars corpus is missing.
  """
  fields = _fields(config)
  name = fields["name"]
  process_count = _check_int(process_count, "process_count", "data.get", low=1)
  process_index = _check_int(process_index, "process_index", "data.get", low=0)
  if process_index >= process_count:
    raise ValueError(f"data.get: process_index must be in [0, process_count={process_count}),"
                     f" got {process_index}")
  batch_size = _check_int(batch_size, "batch_size", "data.get", low=1)
  eval_batch_size = batch_size if eval_batch_size is None else _check_int(
      eval_batch_size, "eval_batch_size", "data.get", low=1)
  for what, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if value % process_count:
      raise ValueError(f"data.get: {what}={value} must be divisible by "
                       f"process_count={process_count}")
  seed = _check_int(seed, "seed", "data.get", low=0)

  spec = _BUILDERS[name](fields)
  task = spec.task
  steps_per_epoch = task.train_size // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"data.get: batch_size={batch_size} is larger than the "
                     f"{task.train_size} training examples of {name}")
  train = _train_dataset(spec, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                         local=batch_size // process_count, seed=seed)
  num_eval_batches = math.ceil(task.eval_size / eval_batch_size)
  evaluation = _eval_dataset(spec, padded=num_eval_batches * eval_batch_size,
                             local=eval_batch_size // process_count)
  return Pipeline(task=task, batch_size=batch_size, eval_batch_size=eval_batch_size,
                  steps_per_epoch=steps_per_epoch, num_eval_batches=num_eval_batches,
                  seed=seed, process_index=process_index, process_count=process_count,
                  info=spec.info, _train=train, _eval=evaluation)


def _seed(seed: int, stream: str) -> int:
  # Independent 32-bit seeds per purpose. Hashing (rather than seed + k) also keeps
  # grain's per-epoch shuffle seeds (seed + epoch) of nearby run seeds apart.
  seq = np.random.SeedSequence([seed, zlib.crc32(stream.encode())])
  return int(seq.generate_state(1, dtype=np.uint32)[0])


def _with_mask(example: Batch, valid: bool = True) -> Batch:
  mask = np.full(np.shape(example["label"]), float(valid), np.float32)
  return {"input": example["input"], "label": example["label"], "mask": mask}


def _train_dataset(spec: _Spec, *, batch_size: int, steps_per_epoch: int, local: int,
                   seed: int) -> grain.MapDataset:
  # Index arithmetic, all grain's: batch i (= step * processes + process) reads stream
  # positions [i * local, (i + 1) * local), i.e. slice `process` of global batch `step`.
  # The slice keeps the first steps_per_epoch * batch_size examples of every epoch: it
  # maps position e * (that) + j to index j of epoch e, which grain's shuffle permutes
  # with its own per-epoch seed. random_map seeds each example's Generator with (seed,
  # stream position), so augmentation never depends on process_count.
  ds = grain.MapDataset.source(spec.train_source)
  if spec.shuffle:
    ds = ds.shuffle(seed=_seed(seed, "shuffle"))
  ds = ds[: steps_per_epoch * batch_size]
  ds = ds.random_map(lambda record, rng: _with_mask(spec.train_fn(record, rng)),
                     seed=_seed(seed, "augment"))
  return ds.batch(local, drop_remainder=True)


class _Padded:
  """A random-access source padded to ``length`` with copies flagged invalid."""

  def __init__(self, source: Sequence[Record], length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> tuple[Record, bool]:
    n = len(self._source)
    return self._source[index % n], index < n


def _eval_dataset(spec: _Spec, *, padded: int, local: int) -> grain.MapDataset:
  ds = grain.MapDataset.source(_Padded(spec.eval_source, padded))
  ds = ds.map(lambda pair: _with_mask(spec.eval_fn(pair[0]), pair[1]))
  return ds.batch(local, drop_remainder=True)


# ------------------------------------------------------------------------- config
def _fields(config: Any) -> dict[str, Any]:
  """The config's fields as a dict, validated; defaults are the builders' business."""
  if isinstance(config, Mapping):
    items = dict(config)
  elif hasattr(config, "items") and callable(config.items):  # ml_collections.ConfigDict
    items = dict(config.items())
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    items = dataclasses.asdict(config)
  elif hasattr(config, "__dict__"):
    items = {k: v for k, v in vars(config).items() if not k.startswith("_")}
  else:
    raise TypeError(f"data.get: config must be a ConfigDict, a mapping or an attribute "
                    f"object, got {type(config).__name__}")
  unknown = sorted(set(items) - set(FIELDS))
  if unknown:
    raise ValueError(f"data config: unknown field(s) {unknown}; known fields: "
                     f"{list(FIELDS)}")
  name = items.get("name")
  if name not in _BUILDERS:
    raise ValueError(f"data config: name must be one of {list(NAMES)}, got {name!r}")
  return items


# ------------------------------------------------------------------------- digits
def digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[dict, dict]:
  """sklearn's 8x8 digits (1,797 images, 10 classes), a fixed stratified split.

  Args:
    test_fraction: the share of images held out, in (0, 1).
    seed: the split's ``random_state``.

  Returns:
    ``(train, test)`` dicts of ``"image"`` float32 ``(N, 8, 8, 1)`` in [0, 1] and
    ``"label"`` int32 ``(N,)``; 1,437 and 360 images with the defaults.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  if (isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real)
      or not 0.0 < test_fraction < 1.0):
    raise ValueError(f"digits: test_fraction must be a float in (0, 1), got {test_fraction!r}")
  test_fraction = float(test_fraction)
  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  try:
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed)
  except ValueError as e:  # Too few test images to hold every class, say.
    raise ValueError(f"digits: test_fraction={test_fraction!r} gives no valid stratified "
                     f"split: {e}") from e
  return {"image": x_tr, "label": y_tr}, {"image": x_te, "label": y_te}


def _digits_example(record: dict) -> Batch:
  return {"input": record["image"], "label": np.int32(record["label"])}


def _digits_spec(fields: dict) -> _Spec:
  _get_augment(fields, "digits", supported=False)
  test_fraction = fields.get("test_fraction")
  test_fraction = 0.2 if test_fraction is None else test_fraction
  split_seed = _get_int(fields, "split_seed", 0, low=0)
  train, test = digits(test_fraction, split_seed)  # Validates test_fraction.
  n_train, n_test = len(train["label"]), len(test["label"])
  task = Task(name="digits", kind="classification", num_classes=10, input_shape=(8, 8, 1),
              input_dtype="float32", train_size=n_train, eval_size=n_test)
  info = {"name": "digits", "test_fraction": float(test_fraction), "split_seed": split_seed,
          "train_size": n_train, "eval_size": n_test}
  return _Spec(task=task, train_source=_Arrays(train), eval_source=_Arrays(test),
               train_fn=lambda record, rng: _digits_example(record),
               eval_fn=_digits_example, info=info)


# -------------------------------------------------------------------------- chars
def _window(ids: np.ndarray, start: int, seq_len: int) -> Batch:
  chunk = ids[start: start + seq_len + 1].astype(np.int32)
  return {"input": chunk[:-1], "label": chunk[1:]}


def _chars_spec(fields: dict) -> _Spec:
  _get_augment(fields, "chars", supported=False)
  seq_len = _get_int(fields, "seq_len", 128, low=1)
  corpus = load_corpus()
  train, valid = corpus.train, corpus.valid
  available = (valid.size - 1) // seq_len  # Non-overlapping (seq_len + 1)-char windows.
  if available < 1 or train.size < seq_len + 1:
    raise ValueError(f"data config: seq_len={seq_len} is too long for the chars corpus "
                     f"({train.size} train / {valid.size} valid characters)")
  eval_windows = _get_int(fields, "eval_windows", available, low=1)
  eval_windows = min(eval_windows, available)
  train_size = train.size // seq_len  # So that an epoch reads about every character once.
  # A shorter "epoch" (windows per epoch) for quick runs; windows still come from all text.
  train_size = min(train_size, _get_int(fields, "train_windows", train_size, low=1))
  task = Task(name="chars", kind="lm", num_classes=CHARS_VOCAB, input_shape=(seq_len,),
              input_dtype="int32", train_size=train_size, eval_size=eval_windows)
  last_start = train.size - seq_len - 1

  def train_fn(_, rng):
    # The window's start comes from the example's own Generator: (seed, position).
    return _window(train, int(rng.integers(0, last_start + 1)), seq_len)

  info = {"name": "chars", "seq_len": seq_len, "eval_windows": eval_windows,
          **corpus.info()}
  return _Spec(task=task, train_source=range(train_size), eval_source=range(eval_windows),
               train_fn=train_fn, eval_fn=lambda i: _window(valid, i * seq_len, seq_len),
               info=info, shuffle=False)


# --------------------------------------------------------------------------- tfds
_TFDS = {
    # name: (train split, eval split, classes, mean, std)
    "cifar10": ("train", "test", 10, CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": ("train", "test", 100, CIFAR100_MEAN, CIFAR100_STD),
    "imagenet2012": ("train", "validation", 1000, IMAGENET_MEAN, IMAGENET_STD),
}


def _tfds_spec(name: str, fields: dict) -> _Spec:
  train_split, eval_split, classes, mean, std = _TFDS[name]
  augment = _get_augment(fields, name, supported=True)
  data_dir = fields.get("data_dir")
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(f"data config: data_dir must be a path, got {data_dir!r}")
  if name == "imagenet2012":
    size = _get_int(fields, "image_size", 224, low=8)

    def eval_image(image):
      return resize_center_crop(image, size)

    def augment_image(image, rng):
      return random_flip(random_resized_crop(image, rng, size), rng)
  else:
    size = 32

    def eval_image(image):
      return image

    augment_image = pad_crop_flip
  train_source = tfds_source(name, train_split, data_dir)
  eval_source = tfds_source(name, eval_split, data_dir)

  def train_fn(record, rng):
    image = np.asarray(record["image"])
    image = augment_image(image, rng) if augment else eval_image(image)
    return {"input": normalize(image, mean, std), "label": np.int32(record["label"])}

  def eval_fn(record):
    image = eval_image(np.asarray(record["image"]))
    return {"input": normalize(image, mean, std), "label": np.int32(record["label"])}

  task = Task(name=name, kind="classification", num_classes=classes,
              input_shape=(size, size, 3), input_dtype="float32",
              train_size=len(train_source), eval_size=len(eval_source))
  info = {"name": name, "data_dir": str(data_dir) if data_dir else _default_tfds_dir(),
          "splits": (train_split, eval_split), "augment": augment, "image_size": size,
          "train_size": task.train_size, "eval_size": task.eval_size}
  return _Spec(task=task, train_source=train_source, eval_source=eval_source,
               train_fn=train_fn, eval_fn=eval_fn, info=info)


_BUILDERS: dict[str, Callable[[dict], _Spec]] = {
    "digits": _digits_spec,
    "fashion_mnist": fashion_mnist.spec,
    "chars": _chars_spec,
    **{name: functools.partial(_tfds_spec, name) for name in _TFDS},
}
NAMES = tuple(_BUILDERS)

# Static facts, for tools that need a model's shape without loading the data.
_NUM_CLASSES = {"digits": 10, "fashion_mnist": 10, "chars": CHARS_VOCAB, "cifar10": 10,
                "cifar100": 100,
                "imagenet2012": 1000}


def num_classes(config: Any) -> int:
  """Classes (vocabulary size for chars) of ``config.name``, without loading anything."""
  return _NUM_CLASSES[_fields(config)["name"]]


def input_shape(config: Any) -> tuple[int, ...]:
  """One example's input shape for ``config``, without loading anything."""
  fields = _fields(config)
  name = fields["name"]
  if name == "digits":
    return (8, 8, 1)
  if name == "fashion_mnist":
    return (28, 28, 1)
  if name == "chars":
    return (_get_int(fields, "seq_len", 128, low=1),)
  if name.startswith("cifar"):
    return (32, 32, 3)
  return (_get_int(fields, "image_size", 224, low=1),) * 2 + (3,)

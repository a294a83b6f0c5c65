"""Fashion-MNIST for `inhernet_jax.data.pipeline` (``name: "fashion_mnist"``): IDX files or TFDS.

60,000 training and 10,000 test 28x28 grey images of clothing, 10 classes (Zalando, MIT
licence). Two ways to provide them, tried in this order:

1. The four IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
   ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``) in
   ``config.data_dir``, or, when no ``data_dir`` is given, in `DEBIAN_DIR`, where the
   Debian package ``dataset-fashion-mnist`` installs them
   (``apt-get install dataset-fashion-mnist``).
2. TFDS ``fashion_mnist`` prepared as ArrayRecord in ``data_dir`` (default TFDS
   directory): ``tfds build fashion_mnist --file_format=array_record``.

Neither: `data.DatasetNotPreparedError` naming both. The pipeline's ``info`` (written to
``data_info.json`` by the experiment) records the IDX files' sha256.

Training images are augmented as the data config says (``augment``, default True):
zero-pad ``pad`` pixels (default 2), random 28x28 crop, and a horizontal flip with
probability 1/2 when ``flip`` (default True). ``train_examples`` keeps only the first N
training images (quick CPU runs; the test set is always complete). Pixels are normalised with the training
set's mean and std (`MEAN`, `STD`).

Example:
  ```python
  pipe = data.get(ml_collections.ConfigDict({"name": "fashion_mnist", "pad": 2,
                                             "flip": False}), batch_size=128, seed=0)
  pipe.train_batch(0)["input"].shape   # (128, 28, 28, 1)
  ```
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os

import numpy as np

from inhernet_jax.data import sources
from inhernet_jax.data.images import normalize

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
TFDS_NAME = "fashion_mnist"
MEAN, STD = (0.2860,), (0.3530,)  # Of the 60,000 training images' pixels in [0, 1].
NUM_CLASSES = 10
SHAPE = (28, 28, 1)
FILES = {  # (split, kind) -> IDX file stem.
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------- IDX
def read_idx(path: str) -> np.ndarray:
  """An IDX file (gzipped when its name ends in ``.gz``) as a NumPy array.

  The format: two zero bytes, a type byte (0x08 uint8, ...), a byte with the number of
  dimensions, one big-endian int32 per dimension, then the values in C order.

  Raises:
    ValueError: the file is not a well-formed IDX file (says what is wrong).
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
    raise ValueError(f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'})")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
  dtype = np.dtype(_DTYPES[raw[2]])
  offset = 4 + 4 * ndim
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) - offset != expected:
    raise ValueError(f"{path}: header says {dims} {dtype} ({expected} bytes of data) but the "
                     f"file holds {len(raw) - offset} bytes after the header")
  return np.frombuffer(raw, dtype, offset=offset).reshape(dims)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzipped when ``path`` ends in ``.gz``): small
  stand-ins for the real files in tests and examples."""
  array = np.ascontiguousarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def write_fake(directory: str, train: int = 20, test: int = 7, *, seed: int = 0,
               gz: bool = True) -> dict:
  """Four IDX files of random images and labels in ``directory`` (created if needed).

  Returns:
    ``{"train": (images, labels), "test": (images, labels)}``, images ``(N, 28, 28)``.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  sets = {split: (rng.integers(0, 256, (n, *SHAPE[:2])).astype(np.uint8),
                  rng.integers(0, NUM_CLASSES, n).astype(np.uint8))
          for split, n in (("train", train), ("test", test))}
  for (split, kind), stem in FILES.items():
    write_idx(os.path.join(directory, stem + (".gz" if gz else "")),
              sets[split][kind == "labels"])
  return sets


def idx_files(directory: str) -> dict[tuple[str, str], str] | None:
  """The four IDX files' paths in ``directory`` (plain or ``.gz``), or None if any is
  missing."""
  out = {}
  for key, stem in FILES.items():
    found = [p for p in (os.path.join(directory, stem + ".gz"), os.path.join(directory, stem))
             if os.path.isfile(p)]
    if not found:
      return None
    out[key] = found[0]
  return out


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _load_idx(files: tuple[tuple[tuple[str, str], str], ...], stamp: tuple) -> tuple:
  """``(train, test, sha256 by file name)``; cached by paths and (size, mtime)."""
  del stamp  # Only part of the cache key: a replaced file is read again.
  paths = dict(files)
  sets = {}
  for split in ("train", "test"):
    images = read_idx(paths[(split, "images")])
    labels = read_idx(paths[(split, "labels")])
    where = f"{paths[(split, 'images')]} / {paths[(split, 'labels')]}"
    if images.ndim != 3 or images.shape[1:] != SHAPE[:2] or images.dtype != np.uint8:
      raise ValueError(f"fashion_mnist {split}: images must be uint8 (N, 28, 28), got "
                       f"{images.dtype} {images.shape} in {where}")
    if labels.ndim != 1 or len(labels) != len(images):
      raise ValueError(f"fashion_mnist {split}: {len(images)} images but labels of shape "
                       f"{labels.shape} in {where}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise ValueError(f"fashion_mnist {split}: labels must be in [0, {NUM_CLASSES}), got "
                       f"[{labels.min()}, {labels.max()}] in {where}")
    sets[split] = {"image": images[..., None], "label": labels.astype(np.int32)}
  hashes = {os.path.basename(p): _sha256(p) for p in paths.values()}
  return sets["train"], sets["test"], hashes


def _stamp(paths) -> tuple:
  return tuple((os.path.getsize(p), os.path.getmtime(p)) for p in paths)


# --------------------------------------------------------------------------- spec
def _sources(data_dir: str | None):
  """``(train, test, info)`` from the IDX files, else from TFDS, else one error."""
  directory = str(data_dir) if data_dir else (DEBIAN_DIR if os.path.isdir(DEBIAN_DIR) else None)
  if directory:
    files = idx_files(directory)
    if files is not None:
      items = tuple(sorted(files.items()))
      train, test, hashes = _load_idx(items, _stamp(files.values()))
      info = {"source": "idx", "data_dir": directory, "sha256": hashes}
      return sources.Arrays(train), sources.Arrays(test), info
  try:
    train = sources.tfds_source(TFDS_NAME, "train", data_dir)
    test = sources.tfds_source(TFDS_NAME, "test", data_dir)
  except (sources.DatasetNotPreparedError, ImportError) as e:
    looked = directory or f"{DEBIAN_DIR} (absent)"
    raise sources.DatasetNotPreparedError(
        f"fashion_mnist: found neither its IDX files nor a prepared TFDS dataset. Either "
        f"(1) put the four IDX files ({', '.join(FILES.values())}, optionally .gz) in "
        f"config.data.data_dir, or install them with `apt-get install dataset-fashion-mnist` "
        f"(into {DEBIAN_DIR}, used when data_dir is unset); looked in {looked}. Or (2) "
        f"prepare TFDS {TFDS_NAME} as ArrayRecord on a machine with network "
        f"(`tfds build {TFDS_NAME} --file_format=array_record`) and set data_dir to its "
        f"data directory. (TFDS said: {e})") from e
  where = str(data_dir) if data_dir else sources.default_tfds_dir()
  return train, test, {"source": "tfds", "data_dir": where}


def spec(fields: dict):
  """The `sources.DatasetSpec` of ``fields`` (a validated data config)."""
  augment = sources.get_augment(fields, TFDS_NAME, supported=True)
  pad = sources.get_int(fields, "pad", 2, low=0)
  flip = fields.get("flip")
  flip = True if flip is None else flip
  if not isinstance(flip, (bool, np.bool_)):
    raise TypeError(f"data config: flip must be a bool, got {flip!r}")
  data_dir = fields.get("data_dir")
  if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
    raise TypeError(f"data config: data_dir must be a path, got {data_dir!r}")
  train_source, eval_source, info = _sources(data_dir)
  limit = sources.get_int(fields, "train_examples", None, low=1)
  if limit is not None and limit < len(train_source):
    train_source = _First(train_source, limit)

  def example(image, label):
    return {"input": normalize(image, MEAN, STD), "label": np.int32(label)}

  def train_fn(record, rng):
    image = np.asarray(record["image"])
    if augment:
      image = augment_image(image, rng, pad=pad, flip=bool(flip))
    return example(image, record["label"])

  def eval_fn(record):
    return example(np.asarray(record["image"]), record["label"])

  task = sources.Task(name=TFDS_NAME, kind="classification", num_classes=NUM_CLASSES,
                      input_shape=SHAPE, input_dtype="float32",
                      train_size=len(train_source), eval_size=len(eval_source))
  info = {"name": TFDS_NAME, **info, "augment": augment, "pad": pad, "flip": bool(flip),
          "train_examples": limit, "train_size": task.train_size, "eval_size": task.eval_size}
  return sources.DatasetSpec(task=task, train_source=train_source, eval_source=eval_source,
                             train_fn=train_fn, eval_fn=eval_fn, info=info)


class _First:
  """The first ``length`` records of a random-access source."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    if not 0 <= index < self._length:
      raise IndexError(index)
    return self._source[index]


def augment_image(image: np.ndarray, rng: np.random.Generator, *, pad: int, flip: bool
                  ) -> np.ndarray:
  """Zero-pad ``pad``, random crop back to the image's size, flip 1/2 when ``flip``."""
  h, w = image.shape[:2]
  if pad:
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=2)
    image = padded[dy: dy + h, dx: dx + w]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return image

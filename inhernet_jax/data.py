"""Embedded data that needs no network: scikit-learn's handwritten digits.

Example::

  train, test = digits()          # dicts of "image" (N, 8, 8, 1) float32, "label" (N,)
"""

from __future__ import annotations

import numpy as np


def digits(test_fraction: float = 0.2, seed: int = 0):
  """sklearn's 8x8 digits (1,797 images, 10 classes), fixed stratified split.

  Pixels are scaled to [0, 1]. The split depends on ``seed`` only.
  """
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  data = load_digits()
  images = (data.images / 16.0).astype(np.float32)[..., None]
  labels = data.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      images, labels, test_size=test_fraction, stratify=labels, random_state=seed
  )
  return {"image": x_tr, "label": y_tr}, {"image": x_te, "label": y_te}


def batches(data: dict, batch_size: int, rng: np.random.Generator):
  """One epoch of shuffled batches (the last partial batch dropped)."""
  order = rng.permutation(len(data["label"]))
  for i in range(len(order) // batch_size):
    idx = order[i * batch_size : (i + 1) * batch_size]
    yield {k: v[idx] for k, v in data.items()}

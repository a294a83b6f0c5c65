"""Image augmentation in NumPy for the TFDS pipelines (no TensorFlow).

CIFAR: zero-pad, random crop, horizontal flip; ImageNet: random-resized crop (torchvision's
algorithm) and flip for training, resize + center crop for evaluation; per-channel
normalisation with the datasets' statistics. Each function takes one uint8 HWC image and
draws its randomness from the ``rng`` it is given, so `inhernet_jax.data.pipeline` controls it.

Example:
  ```python
  x = normalize(pad_crop_flip(image, rng), CIFAR100_MEAN, CIFAR100_STD)
  ```
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Per-channel statistics of the training sets, for pixels in [0, 1].
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_PAD = 4  # Zero padding before the random 32x32 crop.


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 HWC -> float32 ``(image / 255 - mean) / std`` per channel."""
  x = np.asarray(image, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, pad: int = CIFAR_PAD
                  ) -> np.ndarray:
  """CIFAR augmentation: zero-pad ``pad``, random crop to the original size, flip 1/2."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  dy, dx = rng.integers(0, 2 * pad + 1, size=2)
  out = padded[dy: dy + h, dx: dx + w]
  return out[:, ::-1] if rng.random() < 0.5 else out


def _resize(image: np.ndarray, size: tuple[int, int], box: tuple[float, ...]) -> np.ndarray:
  from PIL import Image  # pillow ships with matplotlib.

  pil = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize(size, Image.BILINEAR, box=box))


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop (torchvision's algorithm) resized to ``size x size``.

  A box of ``scale`` of the area and log-uniform aspect ``ratio``; after 10 misses,
  the largest central box whose aspect ratio is within ``ratio``.
  """
  h, w = image.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      y = int(rng.integers(0, h - ch + 1))
      x = int(rng.integers(0, w - cw + 1))
      break
  else:
    if w / h < ratio[0]:
      cw, ch = w, int(round(w / ratio[0]))
    elif w / h > ratio[1]:
      ch, cw = h, int(round(h * ratio[1]))
    else:
      cw, ch = w, h
    y, x = (h - ch) // 2, (w - cw) // 2
  return _resize(image, (size, size), (x, y, x + cw, y + ch))


def resize_center_crop(image: np.ndarray, size: int, resize: int | None = None) -> np.ndarray:
  """Resize the shorter side to ``resize`` (default ``size * 256 / 224``), center crop.

  Done as one resampling of the corresponding box of the original image.
  """
  h, w = image.shape[:2]
  resize = round(size * 256 / 224) if resize is None else resize
  side = size * min(h, w) / resize  # The crop's side in original pixels.
  y, x = (h - side) / 2, (w - side) / 2
  return _resize(image, (size, size), (x, y, x + side, y + side))


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 1/2."""
  return image[:, ::-1] if rng.random() < 0.5 else image

"""Pieces the benchmarks share (no flags here: each benchmark defines its own)."""

from __future__ import annotations

import re


def build_model(name: str, *, tiny: bool = False):
  """``(model, input_shape, num_classes, preset_name)`` for a benchmark model name.

  ``resnet18_cifar``: the usual CIFAR ResNet-18 (3x3 stem, no max-pool, stages of 64,
  128, 256, 512 channels, 11.2M params) as a `cifar.CifarResNet`. ``vit_tiny``: a 4-block
  width-128 ViT on 32x32 inputs (patch 4, 64 tokens). Any `models.NAMES` entry works too.
  """
  from inhernet_jax import models
  from inhernet_jax.models import cifar, transformer

  if name == "resnet18_cifar":
    model = cifar.CifarResNet(stage_sizes=(2, 2, 2, 2), num_filters=(64, 64, 128, 256, 512),
                              num_classes=100)
    return model, (32, 32, 3), 100, "resnet8"
  if name == "vit_tiny":
    if tiny:
      model = transformer.ViT(num_classes=10, patch_size=8, width=64, depth=1, num_heads=4,
                              mlp_dim=128)
    else:
      model = transformer.ViT(num_classes=100, patch_size=4, width=128, depth=4, num_heads=4,
                              mlp_dim=512)
    return model, (32, 32, 3), model.num_classes, "vit_s16"
  if name not in models.NAMES:
    raise ValueError(f"unknown model {name!r}: resnet18_cifar, vit_tiny or one of {models.NAMES}")
  model = models.create(name)
  shape = models.example_input(name).shape[1:]
  classes = getattr(model, "num_classes", None) or getattr(model, "vocab_size")
  return model, tuple(shape), int(classes), name


def matmul_dtypes(stablehlo: str) -> dict[str, int]:
  """Element types of the convolutions and dot_generals in lowered StableHLO text."""
  counts: dict[str, int] = {}
  for line in stablehlo.splitlines():
    if "stablehlo.convolution" in line or "stablehlo.dot_general" in line:
      types_ = re.findall(r"tensor<[^>]*?x?([a-z]+[0-9]+)>", line.rsplit("->", 1)[-1])
      if types_:
        counts[types_[-1]] = counts.get(types_[-1], 0) + 1
  return counts


def markdown_table(head: list[str], rows: list[list[str]], *, left: int | None = None) -> str:
  """A Markdown table of ``head`` and ``rows`` (lists of cell strings; a row may be short).

  The first ``left`` columns are aligned left and the rest right; ``None``: none aligned.

  Example:
    ```python
    markdown_table(["model", "step ms"], [["resnet20", "12.5"]], left=1)
    # '| model | step ms |\n|---|---:|\n| resnet20 | 12.5 |'
    ```
  """
  rule = "|" + "".join("---|" if left is None or i < left else "---:|" for i in range(len(head)))
  lines = ["| " + " | ".join(cells) + " |" for cells in [head, *rows]]
  return "\n".join([lines[0], rule, *lines[1:]])

"""PyTorch rows for `benchmarks.step`: the CIFAR ResNet-18 and the public demo's layer.

The demo (github zyy-2001/InherNet-Demo) replaces a ``k x k`` conv by a ``k x k`` down
conv to ``r`` channels (``r``: ``rank`` times the layer's full rank ``min(out, in k k)``),
``H`` 1x1 expert convs ``r -> out`` and a softmax gate (a Linear ``r -> H`` on the
globally pooled bottleneck, one gate per sample), run eagerly head by head. As in the
issue's measurements the stem and the classifier are kept. Timed as `benchmarks.step`
times JAX: an SGD-momentum train step (cross-entropy, BatchNorm in train mode) and an
eval-mode forward, bf16 autocast, channels_last, the median of ``steps`` calls.

Example:
  ```python
  rows = torch_rows(batch=256, rank=0.25, heads=2, dtype_name="bfloat16")
  ```
"""

from __future__ import annotations

import math
import statistics
import time


def available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def _modules():
  import torch
  from torch import nn

  class DemoConv(nn.Module):
    """The demo's inherited conv: shared k x k down conv, H gated 1x1 experts."""

    def __init__(self, cin, cout, k, stride, padding, rank, heads):
      super().__init__()
      r = max(1, math.ceil(rank * min(cout, cin * k * k)))
      self.down = nn.Conv2d(cin, r, k, stride, padding, bias=False)
      self.heads = nn.ModuleList(nn.Conv2d(r, cout, 1, bias=False) for _ in range(heads))
      self.gate = nn.Linear(r, heads)

    def forward(self, x):
      z = self.down(x)
      g = torch.softmax(self.gate(z.mean((2, 3))), dim=-1)
      return sum(g[:, h, None, None, None] * head(z) for h, head in enumerate(self.heads))

  class Block(nn.Module):
    def __init__(self, cin, cout, stride, conv):
      super().__init__()
      self.conv1, self.bn1 = conv(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)
      self.conv2, self.bn2 = conv(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout)
      self.short = None
      if stride != 1 or cin != cout:
        self.short = nn.Sequential(conv(cin, cout, 1, stride, 0), nn.BatchNorm2d(cout))

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      return torch.relu(y + (x if self.short is None else self.short(x)))

  class ResNet18(nn.Module):
    """CIFAR ResNet-18 (3x3 stem, no max-pool), the same network as
    `benchmarks.common.build_model("resnet18_cifar")`."""

    def __init__(self, conv, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes=100):
      super().__init__()
      self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)  # Kept.
      self.bn = nn.BatchNorm2d(widths[0])
      layers, cin = [], widths[0]
      for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
          layers.append(Block(cin, w, 2 if i > 0 and j == 0 else 1, conv))
          cin = w
      self.layers = nn.Sequential(*layers)
      self.fc = nn.Linear(cin, classes)  # Kept.

    def forward(self, x):
      x = self.layers(torch.relu(self.bn(self.stem(x))))
      return self.fc(x.mean((2, 3)))

  return DemoConv, ResNet18


def _timed(fn, sync, warmup, steps, deadline):
  for _ in range(warmup):
    fn()
  sync()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t)
    if deadline is not None and time.perf_counter() > deadline:
      break
  return statistics.median(times), len(times)


def torch_rows(batch: int, *, rank: float = 0.25, heads: int = 2, dtype_name: str = "bfloat16",
               warmup: int = 1, steps: int = 5, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
               image: int = 32, budget_s: float | None = None) -> list[dict]:
  """Two rows, ``teacher`` and ``demo``, of the PyTorch CIFAR ResNet-18 (model name
  ``resnet18_cifar[torch]``), in `benchmarks.step`'s row format."""
  import torch
  from torch import nn

  DemoConv, ResNet18 = _modules()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  low = dtype_name == "bfloat16"
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(batch, 3, image, image, generator=gen).to(device, memory_format=torch.channels_last)
  y = torch.randint(0, 100, (batch,), generator=gen).to(device)
  convs = {
      "teacher": lambda cin, cout, k, s, p: nn.Conv2d(cin, cout, k, s, p, bias=False),
      "demo": lambda cin, cout, k, s, p: DemoConv(cin, cout, k, s, p, rank, heads),
  }
  rows = []
  for variant, conv in convs.items():
    start = time.perf_counter()
    deadline = None if budget_s is None else start + budget_s
    torch.manual_seed(0)
    model = ResNet18(conv, widths, blocks).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=low)  # noqa: E731

    def train():
      model.train()
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = nn.functional.cross_entropy(model(x).float(), y)
      loss.backward()
      opt.step()

    def evaluate():
      model.eval()
      with torch.inference_mode(), autocast():
        model(x)

    row = {"model": "resnet18_cifar[torch]", "batch": batch, "variant": variant,
           "dtype": dtype_name, "params": sum(p.numel() for p in model.parameters()),
           "mixing": "eager, per head" if variant == "demo" else ""}
    for what, fn in (("train", train), ("eval", evaluate)):
      seconds, row[f"{what}_steps"] = _timed(fn, sync, warmup, steps, deadline)
      row[f"{what}_compile_s"] = 0.0  # Eager.
      row[f"{what}_matmul_dtypes"] = {"bf16 autocast" if low else "f32": 1}
      row[f"{what}_ms"] = seconds * 1e3
      row[f"{what}_examples_per_s"] = batch / seconds
    row["row_s"] = time.perf_counter() - start
    rows.append(row)
  return rows

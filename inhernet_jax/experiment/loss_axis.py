"""A readable loss axis: logarithmic when the plotted losses span more than 10x.

Methods' training losses differ by orders of magnitude (DKD's weighted terms vs plain
cross-entropy, a loss falling from 2.3 to 0.01), so a linear axis flattens all but the
largest curve; `apply` switches such an axis to a log scale after plotting.

Example:
  ```python
  ax.plot(epochs, ce_loss); ax.plot(epochs, dkd_loss)
  loss_axis.apply(ax)          # log y if max / min > 10 (all values positive)
  ```
"""

from __future__ import annotations

import numpy as np

RATIO = 10.0


def scale(values, ratio: float = RATIO) -> str:
  """``"log"`` if the finite ``values`` are all positive and span more than ``ratio``x,
  else ``"linear"`` (a log axis cannot show zero or negative losses)."""
  v = np.asarray(values, dtype=np.float64).ravel()
  v = v[np.isfinite(v)]
  if v.size == 0 or v.min() <= 0:
    return "linear"
  return "log" if v.max() / v.min() > ratio else "linear"


def apply(ax, ratio: float = RATIO) -> str:
  """Sets ``ax``'s y scale from its plotted lines (`scale`) and returns it; a log axis
  says so in its label."""
  ys = [np.asarray(line.get_ydata(), dtype=np.float64).ravel() for line in ax.get_lines()]
  which = scale(np.concatenate(ys) if ys else [], ratio)
  if which == "log":
    ax.set_yscale("log", nonpositive="clip")  # A band's mean - std may dip below 0.
    ax.set_ylabel(f"{ax.get_ylabel()} (log scale)")
  return which

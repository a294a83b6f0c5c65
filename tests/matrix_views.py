"""The reference truncation of the user-model tests (linen and NNX), written by hand:
each kernel's matrix view (stack axes, input axes) and its float64 rank-r truncation."""

import re

import numpy as np


def view(path, ndim, views):
  """``(stack axes, input axes)`` of the kernel at ``path``: the first ``(pattern, (stack,
  ins))`` of ``views`` that matches (``ins`` None: every axis but the last), else a plain
  kernel (every axis but the last is an input)."""
  for pattern, (stack, ins) in views:
    if re.fullmatch(pattern, path):
      return stack, ins if ins is not None else tuple(range(stack, ndim - 1))
  return 0, tuple(range(ndim - 1))


def truncated(kernel, stack, ins, rank):
  """The rank-r truncation (float64 SVD) of each stack slice's matrix view."""
  k = np.asarray(kernel, np.float64)
  outs = [a for a in range(stack, k.ndim) if a not in ins]
  perm = (*range(stack), *ins, *outs)
  t = np.transpose(k, perm)
  m = int(np.prod([k.shape[a] for a in ins]))
  u, s, vt = np.linalg.svd(t.reshape(-1, m, t[(0,) * stack].size // m), full_matrices=False)
  approx = (u[..., :rank] * s[..., None, :rank]) @ vt[..., :rank, :]
  return np.transpose(approx.reshape(t.shape), np.argsort(perm)).astype(kernel.dtype)

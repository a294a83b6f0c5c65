r"""The shared machinery of `inhernet_jax.interop.convert`: PyTorch state dicts in, strict checks out.

Every family converter (`convert_resnet`, `convert_hf`, `convert_efficientnet`) is a list
of `_Leaf` s (our path, the PyTorch name, how the tensor is laid out) handed to
`_assemble`, which refuses missing and unused tensors by name; `match_variables` then
holds the result against the model's own ``jax.eval_shape`` tree. Layouts: conv
``(out, in, kh, kw)`` -> ``(kh, kw, in, out)``, Linear ``(out, in)`` -> ``(in, out)``,
BatchNorm ``weight``/``bias`` -> ``scale``/``bias`` and ``running_mean``/``running_var``
-> ``batch_stats`` ``mean``/``var``.

Example:
  ```python
  state = convert_core.load_state_dict("resnet50.pth")   # name -> np.ndarray
  leaves = convert_core.conv_leaves(("stem",), "conv1")
  variables, sources = convert_core._assemble(state, leaves, (), "my model")
  ```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from inhernet_jax.training import checkpoint
from inhernet_jax.common import utils
from inhernet_jax.interop.checks import ConversionError, check_torch_version, check_weight

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_WRAPPERS = ("state_dict", "model", "model_state_dict")

DEFAULT_IGNORE = {
    "resnet": (r".*\.num_batches_tracked",),
    "vit": (r"(vit\.)?pooler\..*", r"(vit\.)?embeddings\.mask_token"),
    "bert": (r"cls\.(predictions|seq_relationship)\..*", r"(bert\.)?embeddings\.position_ids"),
}
"""PyTorch keys dropped unless ``ignore`` says otherwise: BatchNorm's step counters;
``ViTModel``'s pooler (``ViTForImageClassification`` classifies the class token without
it) and its masked-image-modelling token; BERT's pretraining heads (masked LM, next
sentence) and the ``position_ids`` buffer older checkpoints saved. Pass ``ignore=()`` to
refuse them too, or a longer tuple to drop more."""


log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ loading
def _to_numpy(name: str, value, dtype) -> np.ndarray:
  """A tensor or array as NumPy; floats cast to ``dtype`` unless it is None."""
  if type(value).__module__.startswith("torch"):
    value = value.detach().cpu()
    if value.dtype == _torch().bfloat16:
      if dtype is not None:
        value = value.float()  # NumPy has no bfloat16 of its own: go through float32.
      else:
        import ml_dtypes  # A bit-exact view, not a rounding.

        value = value.view(_torch().int16).numpy().view(ml_dtypes.bfloat16)
    if not isinstance(value, np.ndarray):
      value = value.numpy().copy()  # Not a view of a live torch model's parameters.
  elif not (hasattr(value, "shape") and hasattr(value, "dtype")):
    raise ConversionError(f"state_dict[{name!r}] is a {type(value).__name__}, not a tensor")
  value = np.asarray(value)
  floating = np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16"
  if dtype is not None and floating:
    value = value.astype(dtype, copy=False)
  return value


def _torch():
  try:
    import torch
  except ImportError:
    raise ImportError(
        "reading a PyTorch .pth/.pt/.bin file needs torch: pip install torch (the CPU "
        "build is enough), or convert the file to .safetensors where torch is installed: "
        "safetensors.torch.save_file(torch.load(path), 'model.safetensors')"
    ) from None
  return torch


def _read_safetensors(path: str) -> dict:
  """A ``.safetensors`` file's tensors; a file whose header lies (its length, offsets or
  shapes) or that is not safetensors at all is one `ConversionError` naming it."""
  import safetensors
  import safetensors.numpy

  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError, ValueError, TypeError, OverflowError) as e:
    # The Rust reader checks the header against the file before reading any tensor.
    reason = " ".join(str(e).split())[:300]
    raise ConversionError(f"{path}: not a valid .safetensors file ({reason})") from None


def _read_torch(path: str):
  """A ``.pth``/``.pt``/``.bin`` file's object, read with ``weights_only=True``: a pickle
  that would run code, import a class or is damaged is one `ConversionError` naming it."""
  import pickle
  import zipfile

  torch = _torch()
  check_torch_version(torch.__version__)
  try:
    with warnings.catch_warnings():  # torch warns about odd pickle protocols on stderr.
      warnings.simplefilter("ignore")
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message: "Weights only load failed ... Unsupported global: GLOBAL posix.system".
    why = [l.strip() for l in str(e).splitlines() if "Unsupported" in l or "unsupported" in l]
    detail = f" ({why[0][:200]})" if why else ""
    raise ConversionError(
        f"{path}: refused by torch.load(weights_only=True): it holds more than tensors (a "
        f"pickled object or code{detail}) or is not a PyTorch file; only plain state dicts "
        "are read") from None
  except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
          AttributeError, IndexError, KeyError, MemoryError) as e:
    reason = " ".join(str(e).split())[:200]
    raise ConversionError(f"{path}: not a readable PyTorch file (damaged or truncated? "
                          f"{type(e).__name__}: {reason})") from None


def _unwrap(tree: Mapping) -> Mapping:
  """A training checkpoint's ``{"state_dict": {...}, "epoch": ...}`` -> the state dict."""
  while not any(hasattr(v, "shape") for v in tree.values()):
    inner = [k for k in _WRAPPERS if isinstance(tree.get(k), Mapping)]
    if not inner:
      break
    tree = tree[inner[0]]
  return tree


def load_state_dict(source, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """A flat PyTorch-style state dict ``name -> np.ndarray``.

  Args:
    source: a ``.safetensors`` file (read with ``safetensors.numpy``, no torch needed), a
      ``.pth`` / ``.pt`` / ``.bin`` file (``torch.load(weights_only=True)``, torch
      imported only then), or a mapping already in memory (of torch tensors or arrays).
      A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper is unwrapped, and a
      ``module.`` prefix on every key (DataParallel) dropped.
    dtype: floating tensors are cast to it (float32 by default); None keeps them
      (bfloat16 becomes ``ml_dtypes.bfloat16``). Integer buffers are kept as they are.

  Raises:
    FileNotFoundError: no such file. ImportError: a torch file without torch.
    ConversionError: an entry that is not a tensor (named); a file of an unknown suffix,
      one that is damaged, whose safetensors header does not fit it, or whose pickle
      holds anything but tensors (named, one line).
  """
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
      tree = _read_safetensors(path)
    elif path.endswith(_TORCH_SUFFIXES):
      tree = _read_torch(path)
    else:
      raise ConversionError(
          f"{path}: unknown weights format (suffix {os.path.splitext(path)[1] or 'none'!r}); "
          f"expected .safetensors or one of {', '.join(_TORCH_SUFFIXES)}")
  else:
    tree = source
  if not isinstance(tree, Mapping):
    raise ConversionError(f"expected a state dict (a mapping of tensors), got {type(tree).__name__}")
  tree = _unwrap(tree)
  if tree and all(isinstance(k, str) and k.startswith("module.") for k in tree):
    tree = {k[len("module."):]: v for k, v in tree.items()}
  return {str(k): _to_numpy(k, v, dtype) for k, v in tree.items()}


# ---------------------------------------------------------------------- name mapping
@dataclasses.dataclass(frozen=True)
class _Leaf:
  """One of our variables, the PyTorch tensor it comes from and how."""

  path: tuple[str, ...]  # ("params", "stem", "kernel")
  name: str  # "conv1.weight"
  fn: Callable[[str, np.ndarray], np.ndarray]
  default: np.ndarray | None = None  # Used when the tensor is absent (a zero bias).
  hint: str = ""  # Shown when the tensor is missing.


def _check_ndim(name: str, a: np.ndarray, ndim: int, what: str) -> np.ndarray:
  if a.ndim != ndim:
    raise ConversionError(f"{name}: expected a {what}, got shape {a.shape}")
  return a


def _conv(name, a):
  a = _check_ndim(name, a, 4, "conv weight (out, in, kh, kw)")
  return np.ascontiguousarray(a.transpose(2, 3, 1, 0))


def _linear(name, a):
  return np.ascontiguousarray(_check_ndim(name, a, 2, "Linear weight (out, in)").T)


def _vector(name, a):
  return np.array(_check_ndim(name, a, 1, "vector"))  # Copies: never aliases the input.


def _as_is(name, a):
  return np.array(a)


def _dense_leaves(ours: tuple, theirs: str, bias: bool = True, zero_bias: int | None = None):
  out = [_Leaf(("params", *ours, "kernel"), f"{theirs}.weight", _linear)]
  if bias:
    default = None if zero_bias is None else np.zeros((zero_bias,), np.float32)
    out.append(_Leaf(("params", *ours, "bias"), f"{theirs}.bias", _vector, default))
  return out


def _norm_leaves(ours: tuple, theirs: str, gamma: bool = False):
  weight, bias = ("gamma", "beta") if gamma else ("weight", "bias")
  return [_Leaf(("params", *ours, "scale"), f"{theirs}.{weight}", _vector),
          _Leaf(("params", *ours, "bias"), f"{theirs}.{bias}", _vector)]


def _assemble(state_dict: Mapping, leaves: Sequence[_Leaf], ignore, what: str):
  """The nested variables and ``path -> PyTorch name``; strict both ways."""
  patterns = [re.compile(p) for p in ((ignore,) if isinstance(ignore, str) else ignore)]
  variables, sources, used, missing, hints = {}, {}, set(), [], {}
  for leaf in leaves:
    if leaf.name in state_dict:
      value = leaf.fn(leaf.name, check_weight(leaf.name, state_dict[leaf.name]))
      used.add(leaf.name)
    elif leaf.default is not None:
      value = leaf.default
    else:
      missing.append(f"{leaf.name} (for {'/'.join(leaf.path)})")
      hints.setdefault(leaf.hint)
      continue
    node = variables
    for key in leaf.path[:-1]:
      node = node.setdefault(key, {})
    node[leaf.path[-1]] = value
    sources["/".join(leaf.path)] = leaf.name
  ignored = [k for k in state_dict if k not in used and any(p.fullmatch(k) for p in patterns)]
  unexpected = [k for k in state_dict if k not in used and k not in ignored]
  if missing or unexpected:
    lines = []
    if missing:
      lines.append(f"  missing in state_dict: {_listing(missing)}")
    if unexpected:
      shown = [f"{k} {tuple(np.shape(state_dict[k]))}" for k in unexpected]
      lines.append(f"  unexpected in state_dict (not used by {what}; drop them with "
                   f"ignore=[regex]): {_listing(shown)}")
    lines += [f"  {hint}" for hint in hints if hint]
    raise ConversionError(f"the PyTorch weights do not fit {what}:\n" + "\n".join(lines))
  if ignored:
    log.info("%s: ignored %d PyTorch tensors: %s", what, len(ignored), _listing(ignored))
  return variables, sources


def _listing(items: Sequence[str], limit: int = 20) -> str:
  more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def _ignore(ignore, kind: str):
  ignore = DEFAULT_IGNORE[kind] if ignore is None else ignore
  return (ignore,) if isinstance(ignore, str) else tuple(ignore)


# --------------------------------------------------------------------------- leaves
def conv_leaves(ours: tuple, theirs: str) -> list[_Leaf]:
  """A bias-less PyTorch conv ``theirs.weight`` -> our ``params/*ours/kernel``."""
  return [_Leaf(("params", *ours, "kernel"), f"{theirs}.weight", _conv)]


def batch_norm_leaves(ours: tuple, theirs: str) -> list[_Leaf]:
  """A PyTorch BatchNorm (affine weights and running statistics) -> ours."""
  return [_Leaf((collection, *ours, key), f"{theirs}.{name}", _vector)
          for collection, key, name in (("params", "scale", "weight"), ("params", "bias", "bias"),
                                        ("batch_stats", "mean", "running_mean"),
                                        ("batch_stats", "var", "running_var"))]


# ------------------------------------------------------------------------- matching
def match_variables(converted: Mapping, abstract: Mapping, *,
                    sources: Mapping[str, str] | None = None, limit: int = 20) -> dict:
  """``converted`` checked against the model's own variables, cast to their dtypes.

  Args:
    converted: ``{"params"[, "batch_stats"]}`` from a converter. Not mutated.
    abstract: the model's variables, ``abstract_variables(model, ...)`` (or real ones); the
      sown ``intermediates`` are ignored.
    sources: our ``/``-joined path -> the PyTorch name it came from, shown in the diff.
    limit: keys listed per kind of difference.

  Returns:
    A new nested dict of NumPy arrays with exactly the model's tree.

  Raises:
    ConversionError: missing, unexpected or shape-mismatched paths, all listed (with
      shapes, and the PyTorch names when ``sources`` is given).
  """
  wanted = {k: v for k, v in abstract.items() if k != "intermediates"}
  differences = checkpoint.diff(checkpoint.describe(dict(converted)), checkpoint.describe(wanted),
                                limit, got_name="the converted weights", wanted_name="the model",
                                notes=dict(sources or {}))
  if differences:
    raise ConversionError(f"the converted weights do not match the model:\n{differences}")
  notes = dict(sources or {})

  def cast(name, x, a):
    x = np.asarray(x)
    if np.issubdtype(np.dtype(a.dtype), np.floating) or np.dtype(a.dtype).name == "bfloat16":
      check_weight(f"{name} ({notes[name]})" if name in notes else name, x)
    return np.asarray(x, dtype=a.dtype)

  return utils.map_with_names(cast, dict(converted), wanted)


def abstract_variables(model: nn.Module, example: jax.ShapeDtypeStruct) -> dict:
  """``jax.eval_shape`` of ``model.init`` (eval mode) on ``example``: nothing is computed."""
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), example)


__all__ = [
    "DEFAULT_IGNORE",
    "ConversionError",
    "abstract_variables",
    "batch_norm_leaves",
    "conv_leaves",
    "load_state_dict",
    "match_variables",
]

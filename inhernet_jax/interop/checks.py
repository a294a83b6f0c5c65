"""Checks of untrusted weight files for `inhernet_jax.interop.convert`: tensors, HF configs, indexes.

Everything read from a checkpoint is checked before it is used, with one error naming
the field or tensor: JSON files are read with bounded size and nesting (`read_json`),
weights must be floating point and finite (`check_weight`), a HF config's fields have
the types and ranges the converter relies on, every size bounded (`SIZE_LIMITS`) before
anything is allocated from it (`check_hf_config`; ``num_hidden_layers`` also against the
layers the weights hold, `check_depth`), a sharded checkpoint's index only names files
inside its directory (`shard_files`), and ``.pth`` files are only read by a torch whose
``weights_only=True`` loader is safe (`check_torch_version`).

Example:
  ```python
  check_hf_config(json.load(open("config.json")), "vit")   # ConversionError naming the field
  state = {k: check_weight(k, v) for k, v in state.items()}
  ```
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import numpy as np


class ConversionError(ValueError):
  """Weights that do not fit the model (the message names every offending key)."""


MAX_JSON_BYTES = 64 * 2**20  # A config, an index or a spec.json: far above any real one.
MAX_JSON_DEPTH = 64  # Real configs nest a few levels; 200,000 levels crash the decoder.


def json_depth(value) -> int:
  """The nesting depth of a decoded JSON value, without recursion."""
  deepest, stack = 0, [(value, 1)]
  while stack:
    node, level = stack.pop()
    deepest = max(deepest, level)
    if isinstance(node, dict):
      stack.extend((v, level + 1) for v in node.values())
    elif isinstance(node, list):
      stack.extend((v, level + 1) for v in node)
  return deepest


def read_json(path: str, error: type[Exception] = None):
  """The JSON value of the file ``path``, read as an untrusted file.

  Refused, with one error naming the file: more than `MAX_JSON_BYTES`, not UTF-8, not
  JSON, or nested deeper than `MAX_JSON_DEPTH` (Python's decoder recurses: a file of
  200,000 ``[`` would otherwise end in a ``RecursionError``).

  Raises:
    ``error`` (`ConversionError` by default): the reason, naming ``path``.
  """
  error = error or ConversionError
  size = os.path.getsize(path)
  if size > MAX_JSON_BYTES:
    raise error(f"{path}: {size:,} bytes; a JSON file of at most {MAX_JSON_BYTES:,} bytes "
                "is expected")
  with open(path, "rb") as f:
    raw = f.read(MAX_JSON_BYTES + 1)
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise error(f"{path}: not valid JSON ({e})") from None
  except RecursionError:
    raise error(f"{path}: JSON nested deeper than Python's decoder can follow; at most "
                f"{MAX_JSON_DEPTH} levels are accepted") from None
  depth = json_depth(data)
  if depth > MAX_JSON_DEPTH:
    raise error(f"{path}: JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are "
                "accepted")
  return data


MIN_TORCH = (2, 6)  # torch.load(weights_only=True) runs no pickled code only from 2.6 on.


def check_torch_version(version: str) -> None:
  """Refuses torch < 2.6, whose ``weights_only=True`` loader can run code (CVE-2025-32434)."""
  match = re.match(r"(\d+)\.(\d+)", str(version))
  if match is None or tuple(map(int, match.groups())) < MIN_TORCH:
    raise ImportError(
        f"torch {version} cannot load .pth/.pt/.bin files safely: torch.load(weights_only=True) "
        f"is only safe from torch {'.'.join(map(str, MIN_TORCH))} (CVE-2025-32434); upgrade "
        "torch, or convert the file to .safetensors in a trusted environment")


MAX_LAYERS = 1000  # More than any real encoder: a bigger num_hidden_layers is a broken config.
SIZE_LIMITS = {
    # Each several times the largest real model's (widths of 16k, 262k-token vocabularies,
    # ImageNet-21k's 21,843 labels), so only a broken or hostile config exceeds one; they
    # are checked before anything (a zero head, a model) is built from the config.
    "hidden_size": 65_536, "intermediate_size": 262_144, "num_attention_heads": 1_024,
    "num_hidden_layers": MAX_LAYERS, "image_size": 8_192, "patch_size": 8_192,
    "num_channels": 64, "vocab_size": 1_048_576, "max_position_embeddings": 1_048_576,
    "type_vocab_size": 1_024, "num_labels": 100_000,
}
_POSITIVE = {
    "common": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
    "vit": ("image_size", "patch_size", "num_channels"),
    "bert": ("vocab_size", "max_position_embeddings"),
}


def check_hf_config(config: Mapping, kind: str) -> None:
  """Every field the converter reads, type- and range-checked, one error naming it.

  Raises:
    ConversionError: ``HF config: <field> ...`` (missing, not a positive int, out of range).
  """
  def positive(name, value, required=True):
    if value is None and not required:
      return
    if name in ("image_size", "patch_size") and isinstance(value, (list, tuple)) and value:
      for v in value:
        positive(name, v)
      return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConversionError(f"HF config: {name} must be a positive int, got {value!r}")
    bounded(name, value)

  def bounded(name, value):
    if value > SIZE_LIMITS[name]:
      raise ConversionError(f"HF config: {name}={value} is beyond any real model (at most "
                            f"{SIZE_LIMITS[name]:,})")

  for name in _POSITIVE["common"] + _POSITIVE[kind]:
    if name not in config and name in _POSITIVE["common"]:
      raise ConversionError(f"HF config: {name} is missing (the {kind} config.json has it)")
    positive(name, config.get(name), required=name in _POSITIVE["common"])
  if config["hidden_size"] % config["num_attention_heads"]:
    raise ConversionError(
        f"HF config: hidden_size={config['hidden_size']} is not divisible by "
        f"num_attention_heads={config['num_attention_heads']}")
  type_vocab = config.get("type_vocab_size", 2)
  if isinstance(type_vocab, bool) or not isinstance(type_vocab, int) or type_vocab < 0:
    raise ConversionError(f"HF config: type_vocab_size must be an int >= 0, got {type_vocab!r}")
  bounded("type_vocab_size", type_vocab)
  id2label = config.get("id2label")
  if id2label is not None and not isinstance(id2label, Mapping):
    raise ConversionError(f"HF config: id2label must be an object, got {type(id2label).__name__}")
  if id2label and len(id2label) > SIZE_LIMITS["num_labels"]:
    raise ConversionError(f"HF config: id2label has {len(id2label):,} labels; at most "
                          f"{SIZE_LIMITS['num_labels']:,} (num_labels) are accepted")
  labels = config.get("num_labels", 2)
  if not id2label:
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < 1:
      raise ConversionError(f"HF config: num_labels must be an int >= 1 (classes), got {labels!r}")
    bounded("num_labels", labels)
  eps = config.get("layer_norm_eps", 1e-12)
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
    raise ConversionError(f"HF config: layer_norm_eps must be a number > 0, got {eps!r}")


def check_depth(state_dict: Mapping, config: Mapping, kind: str) -> None:
  """num_hidden_layers must be the layers the weights hold (checked before building
  one name per layer: a config claiming 10**6 layers fails at once)."""
  found = {int(m.group(1)) for k in state_dict
           for m in [re.search(r"(?:^|\.)(?:layer|layers)\.(\d+)\.", k)] if m}
  depth = config["num_hidden_layers"]
  if depth > len(found):
    have = f"layers 0..{max(found)}" if found else "no layers"
    raise ConversionError(f"HF config: num_hidden_layers={depth}, but the {kind} weights hold "
                          f"{have} ({len(found)})")


def check_weight(name: str, a: np.ndarray) -> np.ndarray:
  """A floating, finite tensor, or an error naming it (an int8 or bool tensor would be
  cast to float silently, a NaN would spread through every logit)."""
  dtype = np.dtype(a.dtype)
  if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
    raise ConversionError(f"{name}: dtype {dtype}; weights must be floating point")
  bad = int(a.size - np.count_nonzero(np.isfinite(np.asarray(a, np.float32))))
  if bad:
    raise ConversionError(f"{name}: {bad} NaN/Inf value(s) of {a.size}")
  return a


def shard_files(directory: str, index: str) -> list[str]:
  """The shard files of a sharded checkpoint's index, each inside ``directory``."""
  where = os.path.join(directory, index)
  data = read_json(where)
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ConversionError(f"{where}: weight_map is missing or not a non-empty object "
                          "(tensor name -> shard file)")
  root = os.path.realpath(directory)
  out = []
  for name, shard in sorted(weight_map.items(), key=lambda kv: str(kv[1])):
    if not isinstance(shard, str) or not shard:
      raise ConversionError(f"{where}: weight_map[{name!r}] must be a file name, got {shard!r}")
    full = os.path.realpath(os.path.join(root, shard))
    if os.path.commonpath([root, full]) != root or full == root:
      raise ConversionError(f"{where}: weight_map[{name!r}] = {shard!r} points outside the "
                            f"model directory {root}; refusing to read it")
    if full not in out:
      out.append(full)
  return out


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_LAYERS", "MIN_TORCH", "SIZE_LIMITS",
           "ConversionError", "check_depth", "check_hf_config", "check_torch_version",
           "check_weight", "json_depth", "read_json", "shard_files"]

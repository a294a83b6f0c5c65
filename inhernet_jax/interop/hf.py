r"""Hugging Face ViT / BERT PyTorch weights -> `inhernet_jax.models.transformer`'s variables.

Checkpoints may use the transformers-4 names (``vit.encoder.layer.0.attention.attention.
query.weight``, the Hub's files) or the transformers-5 ones (``vit.layers.0.attention.
q_proj.weight``), with or without the base-model prefix (``vit.`` / ``bert.``). Those
without a classifier are refused unless ``init_head=True`` (a zero head of the config's
``num_labels`` outputs). Strict both ways, like every `inhernet_jax.interop.convert` family;
re-exported by `inhernet_jax.interop.convert`.

Example:
  ```python
  model, variables = convert.from_hf("vit-base-patch16-224/")   # model.safetensors + config.json
  logits = model.apply(variables, images_nhwc, train=False)
  ```
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.interop.checks import (ConversionError, check_depth, check_hf_config,
                                         read_json, shard_files)
from inhernet_jax.interop.state_dict import (_as_is, _assemble, _conv, _dense_leaves, _ignore, _Leaf,
                                       _linear, _norm_leaves, _vector, abstract_variables,
                                       load_state_dict, match_variables)
from inhernet_jax.models import transformer

HF_KINDS = ("vit", "bert")
_ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}


_HF_HINT = (
    "give a directory with model.safetensors (or pytorch_model.bin) and config.json: "
    "download them from the Hub (e.g. huggingface-cli download google/vit-base-patch16-224 "
    "model.safetensors config.json --local-dir DIR) or write them with "
    "model.save_pretrained(DIR)")


def read_hf_config(config) -> dict:
  """A HF config as a dict: from a dict, a ``config.json`` path (or its directory) or a
  transformers ``PretrainedConfig``."""
  if isinstance(config, (str, os.PathLike)):
    path = os.fspath(config)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"no Hugging Face config at {path}: it is the config.json next to the weights "
          "on the Hub, or written by model.save_pretrained(DIR)")
    data = read_json(path)
    if not isinstance(data, dict):
      raise ConversionError(f"{path}: a HF config must be a JSON object, got a "
                            f"{type(data).__name__}")
    return data
  if hasattr(config, "to_dict"):  # A transformers PretrainedConfig.
    return config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(
        f"config must be a dict, a config.json path or a PretrainedConfig, got {config!r}")
  return dict(config)

# ---------------------------------------------------------------------- transformers
def _num_labels(config: dict) -> int:
  id2label = config.get("id2label")
  return len(id2label) if id2label else config.get("num_labels", 2)


def _activation(config: dict, kind: str) -> Callable:
  act = config.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise ConversionError(
        f"{kind} config: hidden_act {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[act]


def _check_type(config: dict, kind: str) -> None:
  model_type = config.get("model_type")
  if model_type is not None and model_type != kind:
    raise ConversionError(f"config.json has model_type {model_type!r}, expected {kind!r}")
  check_hf_config(config, kind)


def _head_leaves(state_dict, config, width: int, init_head: bool, kind: str):
  if "classifier.weight" in state_dict or not init_head:
    hint = "no classifier: init_head=True (--init_head) adds a zero head of num_labels outputs"
    return [dataclasses.replace(leaf, hint=hint) for leaf in _dense_leaves(("head",), "classifier")]
  zeros = lambda *shape: np.zeros(shape, np.float32)
  labels = _num_labels(config)
  return [_Leaf(("params", "head", "kernel"), "classifier.weight", _linear, zeros(width, labels)),
          _Leaf(("params", "head", "bias"), "classifier.bias", _vector, zeros(labels))]


def _prefix(state_dict, prefix: str) -> str:
  return prefix if any(k.startswith(prefix) for k in state_dict) else ""


def _hf_vit(state_dict, config, ignore=None, init_head=False, scan=False):
  state_dict, config = load_state_dict(state_dict), read_hf_config(config)
  _check_type(config, "vit")
  check_depth(state_dict, config, "vit")
  _activation(config, "vit")
  p = _prefix(state_dict, "vit.")
  new = any(re.match(rf"{re.escape(p)}layers\.\d+\.", k) for k in state_dict)  # transformers 5
  width, depth = config["hidden_size"], config["num_hidden_layers"]
  qkv_bias = None if config.get("qkv_bias", True) else width  # Absent biases are zeros.
  leaves = [
      _Leaf(("params", "cls"), f"{p}embeddings.cls_token", _as_is),
      _Leaf(("params", "pos_embed"), f"{p}embeddings.position_embeddings", _as_is),
      _Leaf(("params", "embed", "kernel"), f"{p}embeddings.patch_embeddings.projection.weight",
            _conv),
      _Leaf(("params", "embed", "bias"), f"{p}embeddings.patch_embeddings.projection.bias",
            _vector),
  ]
  for i in range(depth):
    b = f"block_{i}"
    if new:
      layer = f"{p}layers.{i}"
      names = {"query": f"{layer}.attention.q_proj", "key": f"{layer}.attention.k_proj",
               "value": f"{layer}.attention.v_proj", "out": f"{layer}.attention.o_proj",
               "fc1": f"{layer}.mlp.fc1", "fc2": f"{layer}.mlp.fc2"}
    else:
      layer = f"{p}encoder.layer.{i}"
      attn = f"{layer}.attention.attention"
      names = {"query": f"{attn}.query", "key": f"{attn}.key", "value": f"{attn}.value",
               "out": f"{layer}.attention.output.dense",
               "fc1": f"{layer}.intermediate.dense", "fc2": f"{layer}.output.dense"}
    for ours in ("query", "key", "value"):
      leaves += _dense_leaves((b, "attn", ours), names[ours], zero_bias=qkv_bias)
    leaves += _dense_leaves((b, "attn", "out"), names["out"])
    leaves += _dense_leaves((b, "mlp", "fc1"), names["fc1"])
    leaves += _dense_leaves((b, "mlp", "fc2"), names["fc2"])
    leaves += _norm_leaves((b, "norm1"), f"{layer}.layernorm_before")
    leaves += _norm_leaves((b, "norm2"), f"{layer}.layernorm_after")
  leaves += _norm_leaves(("norm",), f"{p}layernorm")
  leaves += _head_leaves(state_dict, config, width, init_head, "vit")
  variables, sources = _assemble(state_dict, leaves, _ignore(ignore, "vit"), "HF ViT")
  return _maybe_scan(variables, sources, depth, scan)


def hf_vit(state_dict, config, *, ignore=None, init_head: bool = False, scan: bool = False) -> dict:
  """``{"params"}`` of ``hf_model(config)`` (a `transformer.ViT`) from a HF ViT.

  Args:
    state_dict: a ``ViTForImageClassification`` or ``ViTModel`` state dict (a file or a
      mapping), transformers-4 or -5 names.
    config: the HF config (a dict, a ``config.json`` path or a ``ViTConfig``).
    ignore: regexes of PyTorch names to drop (default ``DEFAULT_IGNORE["vit"]``).
    init_head: a checkpoint without ``classifier`` gets a zero head (else: an error).
    scan: the layout of ``ViT(scan=True)`` (blocks stacked under ``blocks``).
  """
  return _hf_vit(state_dict, config, ignore, init_head, scan)[0]


def _hf_bert(state_dict, config, ignore=None, init_head=False, scan=False):
  state_dict, config = load_state_dict(state_dict), read_hf_config(config)
  _check_type(config, "bert")
  check_depth(state_dict, config, "bert")
  _bert_checks(config)
  p = _prefix(state_dict, "bert.")
  gamma = any(k.endswith("LayerNorm.gamma") for k in state_dict)  # The oldest checkpoints.
  width, depth = config["hidden_size"], config["num_hidden_layers"]
  e = f"{p}embeddings"
  leaves = [
      _Leaf(("params", "embed", "embedding"), f"{e}.word_embeddings.weight", _as_is),
      _Leaf(("params", "pos_embed"), f"{e}.position_embeddings.weight", _as_is),
  ]
  if config.get("type_vocab_size", 2):
    leaves.append(
        _Leaf(("params", "segment", "embedding"), f"{e}.token_type_embeddings.weight", _as_is))
  leaves += _norm_leaves(("input_norm",), f"{e}.LayerNorm", gamma)
  for i in range(depth):
    b, layer = f"block_{i}", f"{p}encoder.layer.{i}"
    for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
      leaves += _dense_leaves((b, "attn", ours), f"{layer}.attention.self.{theirs}")
    leaves += _dense_leaves((b, "attn", "out"), f"{layer}.attention.output.dense")
    leaves += _norm_leaves((b, "norm1"), f"{layer}.attention.output.LayerNorm", gamma)
    leaves += _dense_leaves((b, "mlp", "fc1"), f"{layer}.intermediate.dense")
    leaves += _dense_leaves((b, "mlp", "fc2"), f"{layer}.output.dense")
    leaves += _norm_leaves((b, "norm2"), f"{layer}.output.LayerNorm", gamma)
  leaves += _dense_leaves(("pooler",), f"{p}pooler.dense")
  leaves += _head_leaves(state_dict, config, width, init_head, "bert")
  variables, sources = _assemble(state_dict, leaves, _ignore(ignore, "bert"), "HF BERT")
  return _maybe_scan(variables, sources, depth, scan)


def _bert_checks(config: dict) -> None:
  """What `BertClassifier` cannot compute is refused rather than converted wrongly."""
  if config.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"bert config: hidden_act {config['hidden_act']!r} is not supported "
                          "(BertClassifier uses the exact GELU, 'gelu')")
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise ConversionError(f"bert config: position_embedding_type "
                          f"{config['position_embedding_type']!r} is not supported (only 'absolute')")
  if config.get("is_decoder") or config.get("add_cross_attention"):
    raise ConversionError("bert config: decoders / cross-attention are not supported")


def hf_bert(state_dict, config, *, ignore=None, init_head: bool = False, scan: bool = False) -> dict:
  """``{"params"}`` of ``hf_model(config)`` (a `transformer.BertClassifier`) from a HF BERT.

  Args:
    state_dict: a ``BertForSequenceClassification``, ``BertModel`` or
      ``BertForPreTraining`` state dict (a file or a mapping); ``LayerNorm.gamma/beta``
      of the oldest checkpoints are read too.
    config: the HF config (a dict, a ``config.json`` path or a ``BertConfig``).
    ignore: regexes of PyTorch names to drop (default ``DEFAULT_IGNORE["bert"]``: the
      pretraining heads ``cls.*`` and ``position_ids``).
    init_head: a checkpoint without ``classifier`` gets a zero head of ``num_labels``
      outputs (else: an error naming ``classifier.weight`` as missing).
    scan: the layout of ``BertClassifier(scan=True)``.
  """
  return _hf_bert(state_dict, config, ignore, init_head, scan)[0]


def _maybe_scan(variables: dict, sources: dict, depth: int, scan: bool):
  """``block_0..block_{depth-1}`` stacked into ``blocks`` (the `nn.scan` layout)."""
  if not scan:
    return variables, sources
  params = dict(variables["params"])
  blocks = [params.pop(f"block_{i}") for i in range(depth)]
  params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
  sources = {k: v for k, v in sources.items() if not k.startswith("params/block_")} | {
      k.replace("params/block_0/", "params/blocks/"): f"{v} (and layers 1..{depth - 1})"
      for k, v in sources.items() if k.startswith("params/block_0/")}
  return {**variables, "params": params}, sources


def hf_model(config, kind: str | None = None, *, scan: bool = False) -> nn.Module:
  """Our teacher (``spec=None``) computing what the HF model of ``config`` computes.

  Args:
    config: a HF config (dict, ``config.json`` path or ``PretrainedConfig``).
    kind: ``"vit"`` or ``"bert"``; by default the config's ``model_type``.
    scan: stack the blocks with `nn.scan`.

  Dropout is off (``dropout_rate=0``); ``model.clone(dropout_rate=...)`` to fine-tune.
  """
  config = read_hf_config(config)
  kind = _kind(config, kind)
  common = dict(width=config["hidden_size"], depth=config["num_hidden_layers"],
                num_heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
                num_classes=_num_labels(config), scan=scan)
  if kind == "vit":
    return transformer.ViT(
        patch_size=_int(config["patch_size"], "patch_size"), pool_type="tok",
        norm_eps=float(config.get("layer_norm_eps", 1e-12)), activation=_activation(config, "vit"),
        **common)
  _bert_checks(config)
  return transformer.BertClassifier(
      vocab_size=config["vocab_size"], max_len=config.get("max_position_embeddings", 512),
      type_vocab_size=config.get("type_vocab_size", 2),
      norm_eps=float(config.get("layer_norm_eps", 1e-12)), **common)


def _int(value, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f"config {name}={value!r}: only square sizes are supported")
    value = value[0]
  return int(value)


def _kind(config: dict, kind: str | None) -> str:
  model_type = config.get("model_type")
  kind = kind or model_type
  if kind not in HF_KINDS:
    raise ConversionError(f"unknown HF model kind {kind!r} (config model_type {model_type!r}); "
                          f"known: {HF_KINDS}")
  _check_type(config, kind)
  return kind


def hf_example_input(config, kind: str | None = None, batch: int = 1) -> jax.ShapeDtypeStruct:
  """An input of the right shape for ``hf_model(config)`` (NHWC images or token ids)."""
  config = read_hf_config(config)
  if _kind(config, kind) == "vit":
    size = _int(config.get("image_size", 224), "image_size")
    return jax.ShapeDtypeStruct((batch, size, size, config.get("num_channels", 3)), jnp.float32)
  return jax.ShapeDtypeStruct((batch, min(16, config.get("max_position_embeddings", 512))), jnp.int32)


def _hf_files(path) -> tuple[Any, str | None]:
  """The weights (file or merged shards) and config.json of a HF model directory."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no weights at {path}: " + _HF_HINT)
    config = os.path.join(os.path.dirname(path), "config.json")
    return path, config if os.path.isfile(config) else None
  config = os.path.join(path, "config.json")
  config = config if os.path.isfile(config) else None
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name), config
  for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
    if os.path.isfile(os.path.join(path, index)):
      merged = {}
      for shard in shard_files(path, index):
        merged.update(load_state_dict(shard))
      return merged, config
  raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}: " + _HF_HINT)


def from_hf(path, kind: str | None = None, *, config=None, ignore=None,
            init_head: bool = False, scan: bool = False):
  """``(model, variables)``: our teacher and a Hugging Face ViT / BERT checkpoint's weights.

  Args:
    path: a model directory (``save_pretrained``'s or the Hub's files: model.safetensors
      or pytorch_model.bin, sharded or not, and config.json) or one weights file.
    kind: ``"vit"`` or ``"bert"``; by default the config's ``model_type``.
    config: the config (dict or path); by default ``config.json`` next to the weights.
    ignore: see `hf_vit` / `hf_bert`.
    init_head: see `hf_vit` / `hf_bert`.
    scan: see `hf_vit` / `hf_bert`.

  Returns:
    `hf_model(config)` (``spec=None``) and its ``{"params"}``.
  """
  weights, found = _hf_files(path)
  if config is None:
    if found is None:
      raise FileNotFoundError(f"no config.json next to {os.fspath(path)}: pass config=... ; "
                              + _HF_HINT)
    config = found
  config = read_hf_config(config)
  kind = _kind(config, kind)
  convert = _hf_vit if kind == "vit" else _hf_bert
  variables, sources = convert(weights, config, ignore, init_head, scan)
  model = hf_model(config, kind, scan=scan)
  abstract = abstract_variables(model, hf_example_input(config, kind))
  return model, match_variables(variables, abstract, sources=sources)


__all__ = ["HF_KINDS", "from_hf", "hf_bert", "hf_example_input", "hf_model", "hf_vit",
           "read_hf_config"]

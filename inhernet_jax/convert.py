r"""PyTorch weights -> this package's Flax variables: torchvision ResNets, HF ViT and BERT.

A converted teacher is the model of `inhernet_jax.models` with ``spec=None`` and its
variables, so it goes straight into `inhernet_jax.inherit`. Conversion is strict, in two
steps, each with a readable error that names every offending key:

1. PyTorch names -> our paths (`torchvision_resnet`, `hf_vit`, `hf_bert`): every tensor
   the model needs must be there, and every tensor that is there must be used, except
   those matched by ``ignore`` (regexes on PyTorch names; `DEFAULT_IGNORE` drops
   BatchNorm's ``num_batches_tracked`` and well-known unused heads, see there).
2. our paths -> the model (`match_variables`): the converted tree must have exactly the
   paths and shapes of the model's own ``jax.eval_shape(model.init ...)``; mismatches
   name the PyTorch tensor each path came from.

Layouts: conv weights ``(out, in, kh, kw)`` become ``(kh, kw, in, out)`` kernels, Linear
``(out, in)`` becomes ``(in, out)``, BatchNorm ``weight``/``bias`` the ``scale``/``bias``
params and ``running_mean``/``running_var`` the ``batch_stats`` ``mean``/``var``. Images
are NHWC here (NCHW in PyTorch). Hugging Face checkpoints may use the transformers-4
names (``vit.encoder.layer.0.attention.attention.query.weight``, the Hub's files) or
the transformers-5 ones (``vit.layers.0.attention.q_proj.weight``), with or without the
base-model prefix (``vit.`` / ``bert.``: ``ViTModel`` / ``BertModel`` files have none).

Checkpoints without a classifier (``ViTModel``, ``BertModel``, ``BertForPreTraining``)
are refused (the ``head`` is reported missing) unless ``init_head=True``, which adds a
zero-initialised head of the config's ``num_labels`` outputs (big_vision's init for
fine-tuning; `models.preset` keeps the head un-factorised anyway).

Example::

  model, variables = convert.from_torchvision("resnet50.pth", "resnet50")
  model, variables = convert.from_hf("vit-base-patch16-224/")   # model.safetensors + config.json
  spec = InherSpec(rank=0.25, heads=3, rules=models.preset("default", "resnet50"))
  student = model.clone(spec=spec)
  logits = student.apply({**variables, "params": inherit(variables["params"], spec)},
                         images_nhwc, train=False)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax import checkpoint
from inhernet_jax.convert_checks import (ConversionError, check_depth, check_hf_config,
                                         check_torch_version, check_weight, shard_files)
from inhernet_jax.models import imagenet, transformer

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

HF_KINDS = ("vit", "bert")
_ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
}

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
    ConversionError: an entry that is not a tensor (named).
  """
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
      import safetensors.numpy

      tree = safetensors.numpy.load_file(path)
    elif path.endswith(_TORCH_SUFFIXES):
      torch = _torch()
      check_torch_version(torch.__version__)
      tree = torch.load(path, map_location="cpu", weights_only=True)
    else:
      raise ValueError(
          f"{path}: unknown weights format; expected .safetensors or one of {_TORCH_SUFFIXES}")
  else:
    tree = source
  if not isinstance(tree, Mapping):
    raise ConversionError(f"expected a state dict (a mapping of tensors), got {type(tree).__name__}")
  tree = _unwrap(tree)
  if tree and all(k.startswith("module.") for k in tree):
    tree = {k[len("module."):]: v for k, v in tree.items()}
  return {str(k): _to_numpy(k, v, dtype) for k, v in tree.items()}


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
    with open(path) as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
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


# ------------------------------------------------------------------------- ResNet
def _resnet_arch(depth) -> str:
  arch = depth if isinstance(depth, str) else f"resnet{depth}"
  if arch not in imagenet.MODELS:
    raise ValueError(f"unknown torchvision ResNet {depth!r}; known: {', '.join(imagenet.MODELS)}")
  return arch


def conv_leaves(ours: tuple, theirs: str) -> list[_Leaf]:
  """A bias-less PyTorch conv ``theirs.weight`` -> our ``params/*ours/kernel``."""
  return [_Leaf(("params", *ours, "kernel"), f"{theirs}.weight", _conv)]


def batch_norm_leaves(ours: tuple, theirs: str) -> list[_Leaf]:
  """A PyTorch BatchNorm (affine weights and running statistics) -> ours."""
  return [_Leaf((collection, *ours, key), f"{theirs}.{name}", _vector)
          for collection, key, name in (("params", "scale", "weight"), ("params", "bias", "bias"),
                                        ("batch_stats", "mean", "running_mean"),
                                        ("batch_stats", "var", "running_var"))]


def _resnet_leaves(arch: str) -> list[_Leaf]:
  ctor = imagenet.MODELS[arch]
  stage_sizes, block = ctor.keywords["stage_sizes"], ctor.keywords["block_cls"]
  bottleneck = block is imagenet.Bottleneck

  conv, bn = conv_leaves, batch_norm_leaves
  leaves = conv(("stem",), "conv1") + bn(("bn_init",), "bn1")
  for i, size in enumerate(stage_sizes):
    for j in range(size):
      ours, theirs = f"layer{i + 1}_{j}", f"layer{i + 1}.{j}"
      for k in range(1, 4 if bottleneck else 3):
        leaves += conv((ours, f"conv{k}"), f"{theirs}.conv{k}")
        leaves += bn((ours, f"bn{k}"), f"{theirs}.bn{k}")
      if j == 0 and (i > 0 or bottleneck):  # Where the block's shape changes (both models).
        leaves += conv((ours, "proj_conv"), f"{theirs}.downsample.0")
        leaves += bn((ours, "proj_bn"), f"{theirs}.downsample.1")
  return leaves + _dense_leaves(("head",), "fc")


def _torchvision_resnet(state_dict, depth, ignore=None):
  arch = _resnet_arch(depth)
  return _assemble(load_state_dict(state_dict), _resnet_leaves(arch),
                   _ignore(ignore, "resnet"), f"torchvision {arch}")


def torchvision_resnet(state_dict, depth: int | str, *, ignore=None) -> dict:
  """``{"params", "batch_stats"}`` of `inhernet_jax.models.imagenet` from torchvision's.

  Args:
    state_dict: a torchvision ``resnet{depth}`` state dict (anything `load_state_dict`
      takes: a file or a mapping). Any width: the stem's channels become ``num_filters``.
    depth: 18, 34, 50, 101 or 152 (or ``"resnet50"``).
    ignore: regexes of PyTorch names to drop (default ``DEFAULT_IGNORE["resnet"]``).

  Raises:
    ConversionError: missing or unused tensors (by PyTorch name), or a tensor of the
      wrong rank.
  """
  return _torchvision_resnet(state_dict, depth, ignore)[0]


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

  def cast(path, x, a):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    x = np.asarray(x)
    if np.issubdtype(np.dtype(a.dtype), np.floating) or np.dtype(a.dtype).name == "bfloat16":
      check_weight(f"{name} ({notes[name]})" if name in notes else name, x)
    return np.asarray(x, dtype=a.dtype)

  return jax.tree_util.tree_map_with_path(cast, dict(converted), wanted)


def abstract_variables(model: nn.Module, example: jax.ShapeDtypeStruct) -> dict:
  """``jax.eval_shape`` of ``model.init`` (eval mode) on ``example``: nothing is computed."""
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), example)


# --------------------------------------------------------------------- file -> model
_TORCHVISION_HINT = (
    "save torchvision's weights where torchvision and the network are available, e.g. "
    "python -c \"import torch, torchvision; torch.save(torchvision.models.{arch}("
    "weights='IMAGENET1K_V2').state_dict(), '{arch}.pth')\" (IMAGENET1K_V1 for resnet18/34)")
_HF_HINT = (
    "give a directory with model.safetensors (or pytorch_model.bin) and config.json: "
    "download them from the Hub (e.g. huggingface-cli download google/vit-base-patch16-224 "
    "model.safetensors config.json --local-dir DIR) or write them with "
    "model.save_pretrained(DIR)")


def from_torchvision(weights, arch: str | int = "resnet50", *, ignore=None):
  """``(model, variables)``: our ``arch`` teacher and torchvision's weights for it.

  Args:
    weights: a ``.pth`` / ``.safetensors`` file of ``torchvision.models.<arch>()``'s
      state dict, or the state dict itself.
    arch: ``"resnet18"`` ... ``"resnet152"`` (or the depth).
    ignore: see `torchvision_resnet`.

  Returns:
    `imagenet.ResNet` (``spec=None``, ``num_classes`` and ``num_filters`` read from the
    weights) and its ``{"params", "batch_stats"}``.
  """
  arch = _resnet_arch(arch)
  if isinstance(weights, (str, os.PathLike)) and not os.path.isfile(weights):
    raise FileNotFoundError(f"no weights file at {os.fspath(weights)}: "
                            + _TORCHVISION_HINT.format(arch=arch))
  variables, sources = _torchvision_resnet(weights, arch, ignore)
  params = variables["params"]
  model = imagenet.MODELS[arch](num_classes=params["head"]["kernel"].shape[-1],
                                num_filters=params["stem"]["kernel"].shape[-1])
  abstract = abstract_variables(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  return model, match_variables(variables, abstract, sources=sources)


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
    ignore, init_head, scan: see `hf_vit` / `hf_bert`.

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


__all__ = [
    "DEFAULT_IGNORE",
    "ConversionError",
    "abstract_variables",
    "from_hf",
    "from_torchvision",
    "hf_bert",
    "hf_example_input",
    "hf_model",
    "hf_vit",
    "check_hf_config",
    "load_state_dict",
    "match_variables",
    "read_hf_config",
    "torchvision_resnet",
]

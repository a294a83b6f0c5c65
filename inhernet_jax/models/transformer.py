"""Transformers built from `InherDense` / `InherConv`: ViT, a BERT-style encoder, GPT-2.

With ``spec=None`` every model is the plain teacher; ``model.clone(spec=s)`` is the
inherited network whose params ``inhernet_jax.inherit(teacher_params, s)`` produces.

Attention is written with four separate Dense layers (``query``, ``key``, ``value``,
``out``; ``nn.MultiHeadDotProductAttention`` uses ``DenseGeneral`` kernels that cannot be
inherited), the MLP with ``fc1`` / ``fc2``; all of them have biases, from which `inherit`
reads the layer axis of scan-stacked kernels.

Parameter names the presets rely on: the ViT patch-embedding conv and the token
embedding (``nn.Embed``) are ``embed``, learned position embeddings are the param
``pos_embed``, the classifier / LM head is ``head``. Blocks are ``block_0 ...
block_{depth-1}``, or one ``nn.scan`` named ``blocks`` with ``scan=True`` (every block
param stacked on a leading layer axis, e.g. ``blocks/attn/query/kernel`` of shape
``(depth, width, width)``).

Example:
  ```python
  teacher = MODELS["vit_s16"](num_classes=100)
  params = teacher.init(key, images)["params"]
  spec = InherSpec(rank=64, heads=2, rules=((r"head/kernel", "skip"),))
  student = teacher.clone(spec=spec)
  logits = student.apply({"params": inherit(params, spec)}, images, train=False)
  ```
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from inhernet_jax.layers.linen import InherConv, InherDense
from inhernet_jax.decomposition.spec import InherSpec

ModuleDef = Any


class MlpBlock(nn.Module):
  """Position-wise MLP ``fc1 -> activation -> fc2`` (back to the input width)."""

  mlp_dim: int
  activation: Callable = nn.gelu
  dropout_rate: float = 0.0
  kernel_init: Callable = nn.initializers.xavier_uniform()
  spec: InherSpec | None = None
  dense: ModuleDef = InherDense

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    dense = functools.partial(self.dense, kernel_init=self.kernel_init, spec=self.spec)
    y = self.activation(dense(self.mlp_dim, name="fc1")(x))
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    return dense(x.shape[-1], name="fc2")(y)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate ``query``/``key``/``value``/``out`` Dense.

  Attributes:
    num_heads: attention heads; must divide the width.
    dropout_rate: dropout on the attention weights.
  """

  num_heads: int
  dropout_rate: float = 0.0
  kernel_init: Callable = nn.initializers.xavier_uniform()
  spec: InherSpec | None = None
  dense: ModuleDef = InherDense

  @nn.compact
  def __call__(
      self, x: jax.Array, mask: jax.Array | None = None, train: bool = True
  ) -> jax.Array:
    """Attends over the second-to-last axis of ``x`` ``(..., length, width)``.

    Args:
      x: the tokens.
      mask: boolean, broadcastable to ``(..., num_heads, length, length)``; False blocks.
      train: enables dropout.
    """
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = functools.partial(self.dense, width, kernel_init=self.kernel_init, spec=self.spec)

    def heads(name):
      return dense(name=name)(x).reshape(*x.shape[:-1], self.num_heads, head_dim)

    q, k, v = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("...qhd,...khd->...hqk", q / np.sqrt(head_dim).astype(q.dtype), k)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=not train)
    y = jnp.einsum("...hqk,...khd->...qhd", weights, v).reshape(x.shape)
    return dense(name="out")(y)


class Block(nn.Module):
  """A transformer block: attention and MLP, each residual, pre- or post-LayerNorm.

  ``__call__`` returns ``(x, None)`` so that the same module is the body of `nn.scan`.

  Attributes:
    pre_norm: ``x + f(LN(x))`` (ViT, GPT-2) if True, ``LN(x + f(x))`` (BERT) if False.
  """

  num_heads: int
  mlp_dim: int
  pre_norm: bool = True
  activation: Callable = nn.gelu
  norm_eps: float = 1e-6
  dropout_rate: float = 0.0
  kernel_init: Callable = nn.initializers.xavier_uniform()
  spec: InherSpec | None = None
  dense: ModuleDef = InherDense

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool):
    attn = SelfAttention(
        self.num_heads, self.dropout_rate, self.kernel_init, self.spec, self.dense, name="attn"
    )
    mlp = MlpBlock(
        self.mlp_dim, self.activation, self.dropout_rate, self.kernel_init, self.spec,
        self.dense, name="mlp",
    )
    norm1 = nn.LayerNorm(epsilon=self.norm_eps, name="norm1")
    norm2 = nn.LayerNorm(epsilon=self.norm_eps, name="norm2")

    def drop(y):
      return nn.Dropout(self.dropout_rate)(y, deterministic=not train)

    if self.pre_norm:
      x = x + drop(attn(norm1(x), mask, train))
      x = x + drop(mlp(norm2(x), train))
    else:
      x = norm1(x + drop(attn(x, mask, train)))
      x = norm2(x + drop(mlp(x, train)))
    return x, None


def _stack(config: dict[str, Any], depth: int, scan: bool, x, mask, train):
  """``depth`` blocks ``Block(**config)`` named ``block_i``, or one `nn.scan` ``blocks``.

  Call from a compact method: the blocks become children of the calling module.
  """
  if scan:
    scanned = nn.scan(
        Block,
        variable_axes={"params": 0, "intermediates": 0},  # sown gate stats: per layer
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,  # mask and train are the same for every layer.
        length=depth,
    )
    return scanned(**config, name="blocks")(x, mask, train)[0]
  for i in range(depth):
    x, _ = Block(**config, name=f"block_{i}")(x, mask, train)
  return x


class ViT(nn.Module):
  """Vision Transformer as in big_vision's ``vit.py`` (``pool_type`` ``'gap'`` or ``'tok'``).

  Patch-embedding conv (with bias), learned position embeddings, pre-LN blocks, final
  LayerNorm, a pooled feature and a linear head. ``pool_type='gap'`` (the default) has no
  class token and averages the final tokens; ``'tok'`` prepends a learned class token
  ``cls`` and classifies its final state (HF ``ViTForImageClassification``, timm and the
  original ViT). As there, the class token gets a position embedding too: ``pos_embed``
  has ``1 + patches`` rows (big_vision adds them to the patches only). A converted HF ViT
  is ``ViT(pool_type="tok", norm_eps=1e-12, activation=exact GELU)`` (`inhernet_jax.interop.convert`).
  Other differences from big_vision: the head is initialised like ``nn.Dense`` (big_vision
  zero-initialises it), there is no optional pre-logits layer, and param names follow this
  package (``embed``, ``cls``, ``pos_embed``, ``norm``, ``head``).

  Attributes:
    num_classes: classifier outputs.
    patch_size: square patches, also the stride of the ``embed`` conv.
    width, depth, num_heads, mlp_dim: the encoder's size.
    dropout_rate: dropout after the embeddings and in the blocks (training only).
    scan: stack the blocks with `nn.scan` (params ``blocks/...`` with a layer axis).
    spec: None for the teacher, an `InherSpec` for the inherited network.
    pool_type: ``"gap"`` (global average, no class token) or ``"tok"`` (class token).
    norm_eps: epsilon of every LayerNorm (big_vision 1e-6, HF 1e-12).
    activation: the MLP's (``nn.gelu``: tanh-approximate as big_vision; HF's ``"gelu"``
      is the exact ``functools.partial(nn.gelu, approximate=False)``).
  """

  num_classes: int = 1000
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  scan: bool = False
  spec: InherSpec | None = None
  dense: ModuleDef = InherDense
  conv: ModuleDef = InherConv
  pool_type: str = "gap"
  norm_eps: float = 1e-6
  activation: Callable = nn.gelu

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Logits ``(batch, num_classes)`` of images ``(batch, height, width, channels)``."""
    if self.pool_type not in ("gap", "tok"):
      raise ValueError(f"ViT.pool_type must be 'gap' or 'tok', got {self.pool_type!r}")
    p = self.patch_size
    x = self.conv(
        self.width, (p, p), strides=(p, p), padding="VALID", spec=self.spec, name="embed"
    )(x)
    x = x.reshape(x.shape[0], -1, self.width)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
      cls = jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype)
      x = jnp.concatenate([cls, x], axis=1)
    pos = self.param(
        "pos_embed", nn.initializers.normal(1 / np.sqrt(self.width)), (1, *x.shape[1:])
    )
    x = nn.Dropout(self.dropout_rate)(x + pos, deterministic=not train)
    block = dict(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        pre_norm=True,
        activation=self.activation,
        norm_eps=self.norm_eps,
        dropout_rate=self.dropout_rate,
        spec=self.spec,
        dense=self.dense,
    )
    x = _stack(block, self.depth, self.scan, x, None, train)
    x = nn.LayerNorm(epsilon=self.norm_eps, name="norm")(x)
    x = x[:, 0] if self.pool_type == "tok" else x.mean(axis=1)
    return self.dense(self.num_classes, spec=self.spec, name="head")(x)


_normal02 = nn.initializers.normal(0.02)  # BERT's and GPT-2's init for all weights.


class BertClassifier(nn.Module):
  """BERT-style encoder with a pooled first-token classifier.

  Token (``embed``) + position (``pos_embed``) + token-type (``segment``, optional)
  embeddings, LayerNorm ``input_norm``, post-LN blocks with exact GELU, a ``pooler``
  Dense with tanh on the first token, then the ``head``: HF
  ``BertForSequenceClassification`` (`inhernet_jax.interop.convert.from_hf` gives the same
  logits, padding mask and token types included). ``bert_base`` without the head is HF
  ``BertModel``'s 109,482,240 parameters.

  Attributes:
    num_classes: classifier outputs.
    vocab_size: token embedding rows.
    width, depth, num_heads, mlp_dim: the encoder's size.
    max_len: rows of the learned position embeddings (longest input).
    type_vocab_size: token types (segments); 0 drops the type embedding.
    dropout_rate: dropout on embeddings, attention, residual branches and the pooled
      feature (training only; BERT used 0.1).
    scan: stack the blocks with `nn.scan`.
    spec: None for the teacher, an `InherSpec` for the inherited network.
    norm_eps: epsilon of every LayerNorm (HF ``layer_norm_eps``).
  """

  num_classes: int = 2
  vocab_size: int = 30522
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_len: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.0
  scan: bool = False
  spec: InherSpec | None = None
  dense: ModuleDef = InherDense
  norm_eps: float = 1e-12

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      train: bool = True,
      token_types: jax.Array | None = None,
      mask: jax.Array | None = None,
  ) -> jax.Array:
    """Logits ``(batch, num_classes)``.

    Args:
      x: token ids ``(batch, length)``, ``length <= max_len``; the first token (``[CLS]``)
        is pooled.
      train: enables dropout.
      token_types: segment ids ``(batch, length)``; zeros when None.
      mask: ``(batch, length)``, True for real tokens, False for padding (keys only).
    """
    length = x.shape[-1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} > max_len {self.max_len}")
    y = nn.Embed(self.vocab_size, self.width, embedding_init=_normal02, name="embed")(x)
    pos = self.param("pos_embed", _normal02, (self.max_len, self.width))
    y = y + pos[:length]
    if self.type_vocab_size:
      types = jnp.zeros_like(x) if token_types is None else token_types
      y = y + nn.Embed(
          self.type_vocab_size, self.width, embedding_init=_normal02, name="segment"
      )(types)
    y = nn.LayerNorm(epsilon=self.norm_eps, name="input_norm")(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    attn_mask = None if mask is None else mask[..., None, None, :].astype(bool)
    block = dict(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        pre_norm=False,
        activation=functools.partial(nn.gelu, approximate=False),
        norm_eps=self.norm_eps,
        dropout_rate=self.dropout_rate,
        kernel_init=_normal02,
        spec=self.spec,
        dense=self.dense,
    )
    y = _stack(block, self.depth, self.scan, y, attn_mask, train)
    dense = functools.partial(self.dense, kernel_init=_normal02, spec=self.spec)
    pooled = jnp.tanh(dense(self.width, name="pooler")(y[..., 0, :]))
    pooled = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
    return dense(self.num_classes, name="head")(pooled)


class GPT(nn.Module):
  """GPT-2-style causal decoder LM.

  Token + learned position embeddings, pre-LN blocks with tanh-approximate GELU under a
  causal mask, final LayerNorm, and an untied bias-free LM ``head`` (GPT-2 ties it to the
  token embedding; untied it is a kernel `inherit` can factorise). GPT-2 scales the
  residual projections' init by ``1/sqrt(2 depth)``; we use ``normal(0.02)`` throughout.

  Attributes:
    vocab_size: token embedding rows and LM head outputs.
    width, depth, num_heads, mlp_dim: the decoder's size.
    max_len: rows of the learned position embeddings (context length).
    dropout_rate: dropout on embeddings, attention and residual branches (training only).
    scan: stack the blocks with `nn.scan`.
    spec: None for the teacher, an `InherSpec` for the inherited network.
  """

  vocab_size: int = 50257
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_len: int = 1024
  dropout_rate: float = 0.0
  scan: bool = False
  spec: InherSpec | None = None
  dense: ModuleDef = InherDense

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Next-token logits ``(batch, length, vocab_size)`` of token ids ``(batch, length)``."""
    length = x.shape[-1]
    if length > self.max_len:
      raise ValueError(f"sequence length {length} > max_len {self.max_len}")
    y = nn.Embed(self.vocab_size, self.width, embedding_init=_normal02, name="embed")(x)
    pos = self.param("pos_embed", _normal02, (self.max_len, self.width))
    y = nn.Dropout(self.dropout_rate)(y + pos[:length], deterministic=not train)
    causal = jnp.tril(jnp.ones((length, length), bool))
    block = dict(
        num_heads=self.num_heads,
        mlp_dim=self.mlp_dim,
        pre_norm=True,
        activation=functools.partial(nn.gelu, approximate=True),
        norm_eps=1e-5,
        dropout_rate=self.dropout_rate,
        kernel_init=_normal02,
        spec=self.spec,
        dense=self.dense,
    )
    y = _stack(block, self.depth, self.scan, y, causal, train)
    y = nn.LayerNorm(epsilon=1e-5, name="norm")(y)
    return self.dense(
        self.vocab_size, use_bias=False, kernel_init=_normal02, spec=self.spec, name="head"
    )(y)


# Sizes: (width, depth, num_heads, mlp_dim).
_VIT = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536), "B": (768, 12, 12, 3072)}


def _vit(variant: str, patch: int):
  width, depth, heads, mlp = _VIT[variant]
  return functools.partial(
      ViT, patch_size=patch, width=width, depth=depth, num_heads=heads, mlp_dim=mlp
  )


# name -> constructor; keyword arguments override any field (``num_classes``, ``scan``,
# ``spec``, ...). The LM takes ``vocab_size`` instead of ``num_classes``.
MODELS = {
    "vit_ti16": _vit("Ti", 16),
    "vit_s16": _vit("S", 16),
    "vit_b16": _vit("B", 16),
    "vit_b32": _vit("B", 32),
    "bert_base": functools.partial(BertClassifier),
    "gpt2_small": functools.partial(GPT),
}

"""Compressed sentence encoders distilled on the teacher's embeddings, and how to judge them.

Students of a `sentence.SentenceBert` teacher at a fraction of its encoder parameters (the
blocks; embeddings are kept and counted as they are):

* InherNet (`student`): ``"uniform"`` (one rank, `budget.uniform`), ``"allocated"``
  (per-layer ranks, `budget.allocate`) or ``"data_aware"`` (uniform ranks, each layer
  truncated for its output error on calibration sentences: `calibration.input_grams`),
  all within `encoder_budget`, blocks inherited by ``models.preset("default", ...)``.
* the standard baseline (`layer_drop`): the teacher with fewer blocks, each initialised
  from an evenly spaced teacher block ending at the last one (DistilBERT's "one layer
  out of two").

`make_step` distils by the embedding loss (`embedding_loss`: 1 - cosine, or MSE) with
optax; `agreement` measures a student against the teacher on held-out sentences: mean
cosine and top-1 / top-10 nearest-neighbour retrieval agreement; `throughput` encodes.

Example:
  ```python
  target = encoder_budget(enc.params, 0.5)
  spec = student_spec("uniform", enc.params, target, heads=2)
  model, params = enc.model.clone(spec=spec), inherit(enc.params, spec)
  agreement(sentence.encode(enc, params, held, model=model), teacher_emb)
  ```
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition import budget
from inhernet_jax.decomposition.spec import InherSpec

METHODS = ("uniform", "allocated", "data_aware", "layer_drop")
LOSSES = ("cosine", "mse")
RULES = models.preset("default", "bert_base")  # The blocks; embeddings kept.


def _is_block(name: str) -> bool:
  return name.startswith("block_") or name == "blocks"


def encoder_params(params: Mapping) -> int:
  """Parameters of the encoder blocks (``block_*`` / ``blocks``)."""
  return accounting.param_count({k: v for k, v in params.items() if _is_block(k)})


def encoder_budget(teacher_params: Mapping, fraction: float) -> int:
  """Total parameters of a student keeping ``fraction`` of the blocks' parameters and
  every other leaf (embeddings, their norm) as it is."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction {fraction!r}: expected a fraction in (0, 1] of the encoder")
  total, enc = accounting.param_count(teacher_params), encoder_params(teacher_params)
  return total - enc + int(math.floor(fraction * enc))


def student_spec(method: str, teacher_params, target: int, *, heads: int) -> InherSpec:
  """The InherNet spec of ``method`` (``uniform``, ``allocated``, ``data_aware``)."""
  if method == "allocated":
    return budget.allocate(teacher_params, target, heads=heads, rules=RULES)
  if method in ("uniform", "data_aware"):
    spec = budget.uniform(teacher_params, target, heads=heads, rules=RULES)
    return spec.replace(data_aware=method == "data_aware")
  raise ValueError(f"method {method!r}: expected one of {METHODS[:3]} (InherNet) or 'layer_drop'")


def layer_indices(depth: int, keep: int) -> list[int]:
  """``keep`` evenly spaced blocks of ``depth``, the last one included (6, 3 -> 1, 3, 5)."""
  if not 1 <= keep <= depth:
    raise ValueError(f"keep={keep}: expected 1 <= keep <= depth {depth}")
  return sorted({int(round(depth - 1 - i * depth / keep)) for i in range(keep)})


def baseline_layers(depth: int, fraction: float) -> int:
  """Blocks of the layer-dropped baseline: ``ceil(fraction * depth)`` (never fewer
  parameters than the InherNet students at ``fraction``)."""
  return max(1, min(depth, math.ceil(fraction * depth - 1e-9)))


def layer_drop(model, params: Mapping, keep: int):
  """``(model, params, indices)`` of the teacher with ``keep`` of its blocks (unscanned)."""
  if getattr(model, "scan", False):
    raise ValueError("layer_drop: give the unscanned teacher (scan=False)")
  idx = layer_indices(model.depth, keep)
  out = {k: v for k, v in params.items() if not _is_block(k)}
  out.update({f"block_{j}": params[f"block_{i}"] for j, i in enumerate(idx)})
  return model.clone(depth=keep), out, idx


# ---------------------------------------------------------------------------- training
def embedding_loss(student: jax.Array, teacher: jax.Array, loss: str = "cosine") -> jax.Array:
  """``1 - cos`` (mean over sentences) or the mean squared error of the embeddings."""
  if loss == "cosine":
    s = student / jnp.maximum(jnp.linalg.norm(student, axis=-1, keepdims=True), 1e-12)
    t = teacher / jnp.maximum(jnp.linalg.norm(teacher, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(1.0 - jnp.sum(s * t, axis=-1))
  if loss == "mse":
    return jnp.mean(jnp.square(student - teacher))
  raise ValueError(f"loss {loss!r}: expected one of {LOSSES}")


def split_params(params: Mapping, train_embeddings: bool) -> tuple[dict, dict]:
  """``(trainable, frozen)``: the blocks (everything when ``train_embeddings``) and the rest."""
  if train_embeddings:
    return dict(params), {}
  return ({k: v for k, v in params.items() if _is_block(k)},
          {k: v for k, v in params.items() if not _is_block(k)})


def optimizer(learning_rate: float, steps: int, warmup_fraction: float = 0.1,
              weight_decay: float = 0.01) -> optax.GradientTransformation:
  """AdamW with linear warm-up and cosine decay to 0 over ``steps``."""
  warmup = int(warmup_fraction * steps)
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup, 1),
                                                max(steps, warmup + 1, 2))
  return optax.adamw(schedule, weight_decay=weight_decay)


def make_step(model, tx: optax.GradientTransformation, loss: str = "cosine"):
  """A jitted ``(trainable, frozen, opt_state, ids, mask, target) -> (trainable,
  opt_state, loss)``: one distillation step of ``model`` (dropout off)."""

  @jax.jit
  def step(trainable, frozen, opt_state, ids, mask, target):
    def loss_fn(tr):
      emb = model.apply({"params": {**frozen, **tr}}, ids, mask)
      return embedding_loss(emb, target, loss)

    value, grads = jax.value_and_grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, value

  return step


def batch_indices(num: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """The sentence indices of training step ``step``: epochs of seeded permutations, so a
  resumed run sees the same batches."""
  start, out = step * batch_size, []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), num)
    perm = np.random.default_rng([seed, epoch]).permutation(num)
    out.extend(perm[offset:offset + batch_size - len(out)].tolist())
  return np.asarray(out)


# -------------------------------------------------------------------------- evaluation
def _unit(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def agreement(student, teacher, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
  """How well ``student`` embeddings ``(n, d)`` stand in for ``teacher``'s.

  Returns:
    ``cosine``: mean cosine between each sentence's two embeddings; ``top{k}``: for each
    sentence as a query against the other ``n - 1``, the fraction of the teacher's ``k``
    nearest neighbours (cosine) that are also the student's ``k`` nearest (``top1``: the
    same nearest neighbour), averaged over queries.
  """
  s, t = _unit(student), _unit(teacher)
  if s.shape != t.shape or s.ndim != 2:
    raise ValueError(f"agreement: student {s.shape} and teacher {t.shape} must be equal (n, d)")
  n = s.shape[0]
  out = {"cosine": float(np.mean(np.sum(s * t, axis=-1)))}
  sim_s, sim_t = s @ s.T, t @ t.T
  np.fill_diagonal(sim_s, -np.inf)
  np.fill_diagonal(sim_t, -np.inf)
  order_s, order_t = np.argsort(-sim_s, axis=1), np.argsort(-sim_t, axis=1)
  for k in ks:
    k_eff = min(k, n - 1)
    hits = [len(set(order_s[i, :k_eff]) & set(order_t[i, :k_eff])) for i in range(n)]
    out[f"top{k}"] = float(np.mean(hits) / k_eff) if k_eff > 0 else float("nan")
  return out


def throughput(fn, params, ids: np.ndarray, mask: np.ndarray, batch_size: int,
               min_seconds: float = 2.0) -> float:
  """Sentences per second of ``fn(params, ids, mask)`` on batches of ``batch_size``
  pre-tokenised sentences (after one compile call; repeated for at least ``min_seconds``)."""
  batches = [(ids[i:i + batch_size], mask[i:i + batch_size])
             for i in range(0, len(ids) - batch_size + 1, batch_size)] or [(ids, mask)]
  jax.block_until_ready(fn(params, *batches[0]))
  done, start = 0, time.perf_counter()
  while True:
    for b in batches:
      jax.block_until_ready(fn(params, *b))
      done += len(b[0])
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds:
      return done / elapsed


def _rate(value) -> str:
  return "-" if value is None else f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
  """Markdown table of result rows (`launch.sentence_distill`'s)."""
  head = ("| student | encoder | params (all) | encoder params | cos before | cos after | "
          "top-1 before | top-1 after | top-10 before | top-10 after | sent/s |")
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    b, a = r["before"], r["after"]
    lines.append(
        f"| {r['label']} | {r['encoder_fraction']:.1%} | {r['params']:,} | "
        f"{r['encoder_params']:,} | {b['cosine']:.4f} | {a['cosine']:.4f} | {b['top1']:.3f} | "
        f"{a['top1']:.3f} | {b['top10']:.3f} | {a['top10']:.3f} | {_rate(r.get('sentences_per_s'))} |")
  return "\n".join(lines)

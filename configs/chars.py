r"""Character-level LM on the Python standard library's own source: GPT teacher -> students / InherNet.

The corpus is a fixed list of stdlib modules (`inhernet_jax.data.pipeline`, ``chars``), ASCII
vocabulary of 128, deterministic train/valid split; the metric is validation
bits-per-character (lower is better). Teacher: a 4-layer, width-128 GPT decoder; student:
the same depth at width 64; InherNet inherits the teacher's blocks (embeddings and LM
head kept) at the largest rank with no more parameters than the student, 2 heads (the
paper's setting for T5).

  python -m launch.main --config=configs/chars.py --workdir=workdir/chars
  python -m launch.main --config=configs/chars.py:local --workdir=/tmp/c   # seconds
  python -m launch.main --config=configs/chars.py:seeds=1,compute_dtype=bfloat16 --workdir=...

Arguments (``chars.py:key=value,...``): ``variant`` default | local, ``seeds`` (default 3;
1 for local).
"""

import ml_collections

from configs import common


def _gpt(width: int, depth: int, heads: int, seq_len: int) -> dict:
  return {"width": width, "depth": depth, "num_heads": heads, "mlp_dim": 4 * width,
          "max_len": seq_len}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, variant="default", seeds=0)
  c = common.base()
  c.name = "chars: GPT teacher -> GPT student / InherNet (stdlib source, bits per char)"
  c.seeds = arg.seeds or 3
  seq_len = 64
  # An "epoch" here is 6,400 random windows (200 steps), about a fifth of the train text.
  c.data = ml_collections.ConfigDict(
      {"name": "chars", "seq_len": seq_len, "eval_windows": 1024, "train_windows": 6400})
  c.batch_size = 32
  c.eval_batch_size = 64
  c.epochs = 4
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 3e-3, "schedule": "cosine", "warmup_steps": 100,
      "weight_decay": 0.1, "weight_decay_mask": "kernels", "grad_clip_norm": 1.0,
  })
  c.teacher = ml_collections.ConfigDict(
      {"model": "gpt2_small", "kwargs": _gpt(128, 4, 4, seq_len), "epochs": 8, "checkpoint": ""})
  hint = {"student_layer": "block_1", "teacher_layer": "block_1", "weight": 1.0}
  c.method_defs = common.kd_methods(
      "gpt2_small", _gpt(64, 4, 4, seq_len), kd={"alpha": 0.3, "temperature": 2.0},
      dkd={"alpha": 1.0, "beta": 2.0, "temperature": 2.0}, hint=hint, heads=2,
      label="GPT w64")
  c.methods = "student,student_kd,inherit,inherit_kd"
  if arg.variant == "local":
    c.seeds = arg.seeds or 1
    c.data.seq_len = 16
    c.data.eval_windows = 64
    c.data.train_windows = 400
    c.batch_size = 8
    c.epochs = 1
    c.teacher.epochs = 1
    c.teacher.kwargs = _gpt(32, 2, 2, 16)
    c.optimizer.warmup_steps = 5
    for name in c.method_defs:
      if c.method_defs[name].kind == "student":
        c.method_defs[name].kwargs = _gpt(24, 2, 2, 16)
    c.methods = "student,student_kd,student_fitnet,inherit,inherit_kd"
    c.checkpoint_every_steps = 50
    c.progress = False
  elif arg.variant == "beyond":  # Data-aware inheritance and budget-matched ranks.
    c.methods = "student,inherit,inherit_aware,inherit_greedy,inherit_greedy_aware"
  elif arg.variant != "default":
    raise ValueError(f"chars.py: unknown variant {arg.variant!r} (default, local, beyond)")
  return c

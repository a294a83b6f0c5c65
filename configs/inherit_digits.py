r"""Inherit a digits CNN teacher and fine-tune it: the quick start's job.

Trains a small CNN teacher on scikit-learn's digits, inherits it at each (rank, heads),
evaluates the inherited network before fine-tuning (it computes the teacher's rank-r
truncation) and after, and trains the same factorised network from random init for the
same epochs (InherNet without SVD init) for comparison.

  python -m launch.demo --config=configs/inherit_digits.py
  python -m launch.demo --config=configs/inherit_digits.py:local   # seconds, for tests
"""

import ml_collections


def get_config(arg: str = "default"):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 64
  c.learning_rate = 1e-3
  c.teacher_epochs = 30
  c.finetune_epochs = 10
  c.widths = (32, 64, 128)  # conv, conv (stride 2), dense; then the 10-way classifier.
  c.ranks = (4, 8)
  c.heads = (1, 3)
  if arg == "local":
    c.teacher_epochs = 3
    c.finetune_epochs = 1
    c.widths = (8, 16, 32)
    c.ranks = (4,)
    c.heads = (1, 2)
  elif arg != "default":
    raise ValueError(f"unknown variant {arg!r}; expected 'default' or 'local'")
  return c

r"""The converged Fashion-MNIST benchmark (issue 27), as resumable pieces.

One config variant per piece: the teacher, and every row of the table at every seed,
plus the compression curve's extra sizes. `launch.pieces` runs them in order into one
root directory, skipping finished pieces and resuming a killed one from its
checkpoints; `inhernet_jax.experiment.pieces` writes the combined ``results.json`` /
``results.md`` (mean +- std over seeds, Welch's t-test of InherNet against the best
student) and the curve (table + PNG).

  nice -n 19 python -m launch.pieces --config=configs/fmnist_converged.py \
      --root=$HOME/fmnist_converged --out=docs/results/fmnist_converged
  # one piece by hand (what the runner does for each):
  python -m launch.main --config=configs/fmnist_converged.py:piece=student_kd,seed=1,root=R \
      --workdir=R/student_kd/seed_1

Setup (the arithmetic is in docs/results.md, "Converged Fashion-MNIST"): all 60,000
training and 10,000 test images; teacher RepDistiller's resnet8 (16/16/32/64 channels,
78k parameters); student resnet8 at half widths (20k, 25.6% of the teacher); every
method the same ``epochs`` with SGD (momentum 0.9, weight decay 5e-4, lr 0.05, batch
128) on a cosine schedule; 3 seeds. InherNet rows spend the student's parameters by
per-layer ranks (`budget.allocate`, ``allocation="greedy"``): a uniform rank cannot come
within 2% of a given count on a network this small (one rank step of resnet8 with
H = 3 is ~13% of the student).

Arguments (``fmnist_converged.py:key=value,...``): ``piece`` (``teacher`` or a key of
`ROWS` / `CURVE`), ``seed``, ``root`` (where the teacher piece's checkpoints are:
``<root>/teacher``), ``epochs``, ``teacher_epochs``, ``train_examples`` (0: all;
smaller for tests), ``local`` (tiny widths for tests).
"""

import ml_collections

from configs import common

TEACHER = ("resnet8", (16, 16, 32, 64))
STUDENT_WIDTHS = {25: (8, 8, 16, 32), 10: (5, 5, 10, 20), 50: (12, 12, 24, 44)}
SEEDS = (0, 1, 2)
EPOCHS, TEACHER_EPOCHS = 3, 15
KD = {"alpha": 0.1, "temperature": 4.0}           # mdistiller KD: 0.1 CE + 0.9 T^2 KL.
HEADS = 3                                          # The paper's heads.
# DKD's warm-up: mdistiller ramps its weight over the first 20 of 240 epochs.
DKD_WARMUP_FRACTION = 20 / 240
# RepDistiller's hint: the output of stage 2 (feat[2]), weight (-b) 100, one stage.
HINT = {"student_layer": "layer2_0", "teacher_layer": "layer2_0", "weight": 100.0}


def _inherit(heads=HEADS, **kw):
  return {"kind": "inhernet", "heads": heads, "preset": "default", "allocation": "greedy",
          "loss": "ce", **kw}


def rows(epochs: int) -> dict[str, dict]:
  """The table's rows at the student's size: key -> method definition (no rank: the
  runner sets it to the student's parameter count)."""
  student = {"kind": "student", "model": TEACHER[0],
             "kwargs": {"num_filters": STUDENT_WIDTHS[25]}}
  dkd = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0,
         "warmup_epochs": round(DKD_WARMUP_FRACTION * epochs, 4)}
  return {
      "student": {**student, "loss": "ce", "label": "student (scratch)"},
      "student_kd": {**student, "loss": "kd", "loss_kwargs": KD, "label": "student + KD"},
      "student_dkd": {**student, "loss": "dkd", "loss_kwargs": dkd, "label": "student + DKD"},
      "student_fitnet": {**student, "loss": "fitnet", "hint": HINT, "label": "student + FitNet"},
      "inherit_h1": _inherit(1, label="InherNet H=1 (= plain low-rank ablation)"),
      "inherit_h2": _inherit(2, label="InherNet H=2"),
      "inherit_h3": _inherit(3, label="InherNet H=3"),
      "inherit_kd": _inherit(loss="kd", loss_kwargs=KD, label="InherNet H=3 + KD"),
      "inherit_aware": _inherit(data_aware=True, recalibrate=True,
                                label="InherNet H=3, data-aware + BN re-estimation"),
      "ablate_no_gate": _inherit(variant="no_gate", label="ablation: without gate (H=3)"),
      "ablate_symmetric": _inherit(variant="symmetric", label="ablation: symmetric (H=3)"),
      "ablate_random": _inherit(init="random", label="ablation: without SVD init (H=3)"),
  }


# The compression curve's other sizes (the 25% point is the table's rows above).
CURVE_METHODS = ("student", "student_kd", "inherit_h3")


def curve_pieces() -> dict[str, tuple[int, str]]:
  """``curve<pct>_<row>`` -> (percent of the teacher, row)."""
  return {f"curve{p}_{m}": (p, m) for p in (10, 50) for m in CURVE_METHODS}


def pieces(seeds=SEEDS) -> list[tuple[str, int]]:
  """Every piece in running order: the teacher, seed 0 of every row, then the other
  seeds, then the curve (seed 0)."""
  out = [("teacher", 0)]
  for s in seeds:
    out += [(r, s) for r in rows(EPOCHS)]
  out += [(p, 0) for p in curve_pieces()]
  return out


def student_count(widths, local: bool = False) -> int:
  """The parameter count of resnet8 at ``widths`` on 28x28x1 images, 10 classes."""
  import jax
  import jax.numpy as jnp
  from inhernet_jax import models
  model = models.create(TEACHER[0], num_classes=10, num_filters=tuple(widths))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                             train=False))
  return int(sum(x.size for x in jax.tree.leaves(shapes["params"])))


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, piece="teacher", seed=0, root="", epochs=EPOCHS,
                         teacher_epochs=TEACHER_EPOCHS, train_examples=0, local=False)
  table, curve = rows(arg.epochs), curve_pieces()
  if arg.piece != "teacher" and arg.piece not in table and arg.piece not in curve:
    raise ValueError(f"fmnist_converged.py: unknown piece {arg.piece!r}; known: teacher, "
                     f"{', '.join([*table, *curve])}")
  c = common.base()
  c.name = f"Fashion-MNIST converged: {arg.piece}"
  c.seed, c.seeds = arg.seed, 1
  c.data = ml_collections.ConfigDict(
      {"name": "fashion_mnist", "data_dir": "", "augment": True, "pad": 2, "flip": True})
  if arg.train_examples:
    c.data.train_examples = arg.train_examples
  c.batch_size, c.eval_batch_size = 128, 1000
  c.epochs = arg.epochs
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
      "weight_decay_mask": "all", "schedule": "cosine"})
  c.checkpoint_every_steps = 100
  c.progress = False
  teacher_widths = (8, 8, 16, 16) if arg.local else TEACHER[1]
  c.teacher = ml_collections.ConfigDict({
      "model": TEACHER[0], "kwargs": {"num_filters": teacher_widths},
      "epochs": arg.teacher_epochs, "checkpoint": ""})
  percent, row = 25, arg.piece
  if arg.piece in curve:
    percent, row = curve[arg.piece]
  widths = STUDENT_WIDTHS[percent]
  if arg.local:  # Tests: a (8, 8, 16, 16) teacher, students at about its 25/10/50%.
    widths = {25: (6, 6, 12, 12), 10: (4, 4, 8, 8), 50: (7, 7, 14, 14)}[percent]
  md = dict(table["student" if row == "teacher" else row])
  if md["kind"] == "student":
    md["kwargs"] = {"num_filters": widths}
  else:  # InherNet: the student's parameter count as the budget.
    md["rank"] = student_count(widths)
  if percent != 25:
    md["label"] = f"{md['label']} ({percent}% size)"
  c.method_defs = {row if row != "teacher" else "student": md}
  c.methods = row if row != "teacher" else "student"
  c.piece = arg.piece
  if arg.piece != "teacher":
    if not arg.root:
      raise ValueError(f"fmnist_converged.py: piece {arg.piece!r} needs root=<the benchmark's "
                       "root directory> (its teacher is <root>/teacher)")
    c.teacher.checkpoint = f"{arg.root}/teacher/seed_0/teacher"
  if arg.local:
    c.batch_size, c.eval_batch_size, c.checkpoint_every_steps = 32, 256, 10
  return c

r"""The default experiment: a digits CNN teacher, students and InherNet (no network).

scikit-learn's 8x8 digits (1,437 train / 360 test images, fixed stratified split). The
teacher is a 151k-parameter CNN; the student the same CNN at half the widths (38k
parameters, a quarter); InherNet inherits the teacher at the largest rank with no more parameters than
the student. All methods train for the same epochs.

  python -m launch.main --config=configs/digits.py --workdir=workdir/digits
  python -m launch.main --config=configs/digits.py:local --workdir=/tmp/d   # seconds
  python -m launch.main --config=configs/digits.py:sweep --workdir=workdir/sweep  # Fig. 4
  python -m launch.main --config=configs/digits.py:seeds=1 --workdir=/tmp/d1

Arguments (``digits.py:key=value,...``): ``variant`` default | local | sweep,
``seeds`` (default 3; 1 for local), ``divisor`` (the student is the teacher CNN
with every width divided by it; default 2: 38k parameters, 25% of the teacher; 4: 9.8k,
6.5%).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, variant="default", seeds=0, divisor=2)  # seeds 0: the variant's
  c = common.base()
  c.name = "digits: CNN teacher -> CNN student / InherNet"
  c.seeds = arg.seeds or 3
  c.data = ml_collections.ConfigDict({"name": "digits"})
  c.batch_size = 64
  c.epochs = 20
  c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3, "schedule": "constant"})
  c.teacher = ml_collections.ConfigDict(
      {"model": "cnn", "kwargs": {"widths": (32, 64, 128)}, "epochs": 30, "checkpoint": ""})
  hint = {"student_layer": "conv", "teacher_layer": "conv", "weight": 1.0}
  widths = tuple(w // arg.divisor for w in (32, 64, 128))
  c.method_defs = common.kd_methods(
      "cnn", {"widths": widths}, kd={"alpha": 0.3, "temperature": 4.0},
      dkd={"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, hint=hint, heads=3,
      label=f"CNN widths/{arg.divisor}")
  c.methods = "student,student_kd,student_dkd,student_fitnet,inherit,inherit_kd,inherit_random"
  if arg.variant == "local":  # Every code path in seconds: for tests.
    c.seeds = arg.seeds or 1
    c.epochs = 2
    c.teacher.epochs = 3
    c.teacher.kwargs = {"widths": (8, 16, 32)}
    for name in ("student", "student_kd", "student_dkd", "student_fitnet"):
      c.method_defs[name].kwargs = {"widths": (4, 8, 16)}
    c.checkpoint_every_steps = 10
    c.progress = False
  elif arg.variant == "sweep":  # The paper's Figure 4: accuracy over rank x heads.
    c.methods = "student,inherit"
    c.sweep = ml_collections.ConfigDict({"ranks": (4, 8, 16, 32), "heads": (1, 2, 3)})
  elif arg.variant == "beyond":  # Data-aware inheritance and budget-matched ranks.
    c.methods = "student,inherit,inherit_aware,inherit_greedy,inherit_greedy_aware"
  elif arg.variant != "default":
    raise ValueError(f"digits.py: unknown variant {arg.variant!r} (default, local, sweep, beyond)")
  return c

r"""Fashion-MNIST: a BatchNorm CIFAR-style ResNet teacher, its quarter-size student, InherNet.

Real images (60,000 / 10,000 28x28 grey clothing photos, 10 classes) from the Debian
package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) or TFDS;
see `inhernet_jax.fashion_mnist`. The teacher is RepDistiller's resnet8 (78k parameters,
BatchNorm after every conv); the student the same network at half the widths (20k, a
quarter); InherNet inherits the teacher at the largest rank with no more parameters than
the student. Adam, equal epochs for every method.

  python -m launch.main --config=configs/fashion_mnist.py --workdir=workdir/fmnist
  python -m launch.main --config=configs/fashion_mnist.py:bn --workdir=workdir/fmnist_bn
  python -m launch.main --config=configs/fashion_mnist.py:local --workdir=/tmp/f  # seconds

Variants (``fashion_mnist.py:key=value,...``):

* ``default``: every method (scratch, KD, DKD, FitNet, InherNet CE / KD, random-init
  ablation, data-aware), with BatchNorm re-estimation for InherNet.
* ``bn``: BatchNorm re-estimation measured: scratch and InherNet plain / data-aware x
  with / without re-estimation (``recalibrate``), on ``train_examples`` images.
* ``local``: every code path in seconds, for tests (tiny widths, 512 images).

Arguments: ``variant``, ``seeds`` (default 1), ``epochs`` (of every method; default 3),
``teacher_epochs`` (default 6), ``train_examples`` (training images used; default 12000
for ``bn``, 0: all 60,000).
"""

import ml_collections

from configs import common

TEACHER = ("resnet8", (16, 16, 32, 64))
STUDENT = ("resnet8", (8, 8, 16, 32))


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, variant="default", seeds=1, epochs=3, teacher_epochs=6,
                         train_examples=-1)
  c = common.base()
  c.name = "fashion_mnist: resnet8 teacher -> resnet8/2 student / InherNet"
  c.seeds = arg.seeds
  c.data = ml_collections.ConfigDict({"name": "fashion_mnist", "data_dir": "",
                                      "augment": True, "pad": 2, "flip": True})
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = arg.epochs
  c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3,
                                           "schedule": "constant"})
  c.checkpoint_every_steps = 200
  c.progress = False
  c.teacher = ml_collections.ConfigDict({
      "model": TEACHER[0], "kwargs": {"num_filters": TEACHER[1]}, "epochs": arg.teacher_epochs,
      "checkpoint": ""})
  hint = {"student_layer": "layer3_0", "teacher_layer": "layer3_0", "weight": 1.0}
  c.method_defs = common.kd_methods(
      STUDENT[0], {"num_filters": STUDENT[1]}, kd={"alpha": 0.3, "temperature": 4.0},
      dkd={"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, hint=hint, heads=3,
      label="resnet8 widths/2")
  # BatchNorm re-estimation on 32 training batches (the default, said explicitly here).
  for name in ("inherit", "inherit_kd", "inherit_aware", "inherit_greedy",
               "inherit_greedy_aware"):
    c.method_defs[name].recalibrate = True
  for name, base in (("inherit_plain", "inherit"), ("inherit_aware_plain", "inherit_aware")):
    # The same gate init as its re-estimated twin: the runs differ only in BN statistics.
    c.method_defs[name] = dict(c.method_defs[base].to_dict(), recalibrate=False, init_key=base,
                               label=c.method_defs[base].label + ", teacher's BN statistics")
  c.methods = ("student,student_kd,student_dkd,student_fitnet,inherit,inherit_kd,"
               "inherit_random,inherit_aware")
  examples = arg.train_examples
  if arg.variant == "bn":
    c.methods = "student,inherit_plain,inherit,inherit_aware_plain,inherit_aware"
    examples = 12000 if examples < 0 else examples
  elif arg.variant == "local":  # Every code path in seconds: for tests.
    c.epochs = 1 if arg.epochs == 3 else arg.epochs
    c.teacher.epochs = 1 if arg.teacher_epochs == 6 else arg.teacher_epochs
    c.teacher.kwargs = {"num_filters": (8, 8, 16, 16)}
    for name in ("student", "student_kd", "student_dkd", "student_fitnet"):
      c.method_defs[name].kwargs = {"num_filters": (4, 4, 8, 8)}
    c.methods = "student,inherit_plain,inherit,inherit_aware"
    c.batch_size = 32
    c.eval_batch_size = 500
    c.checkpoint_every_steps = 10
    examples = 512 if examples < 0 else examples
  elif arg.variant != "default":
    raise ValueError(f"fashion_mnist.py: unknown variant {arg.variant!r} (default, bn, local)")
  if examples > 0:
    c.data.train_examples = examples
  return c

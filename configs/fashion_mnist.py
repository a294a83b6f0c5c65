r"""Fashion-MNIST: the 2-core CPU comparison, and the paper's CIFAR-100 pairs for a GPU.

Real images (60,000 / 10,000 28x28 grey clothing photos, 10 classes) from the Debian
package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) or TFDS;
see `inhernet_jax.data.fashion_mnist`.

The default (CPU) comparison: RepDistiller's resnet8 teacher (78k parameters, BatchNorm
after every conv) trained once, its student at half the widths (20k, a quarter), and
InherNet inheriting the teacher at the largest rank with no more parameters than the
student. Every method (scratch, KD, DKD, FitNet, InherNet CE / KD, the random-init
ablation, data-aware InherNet) trains the same epochs with Adam on the first 12,000
training images, 3 seeds; the test set is always the full 10,000. 54 minutes on a
shared 2-core CPU (the README's table).

  python -m launch.main --config=configs/fashion_mnist.py --workdir=workdir/fmnist
  python -m launch.main --config=configs/fashion_mnist.py:bn --workdir=workdir/fmnist_bn
  python -m launch.main --config=configs/fashion_mnist.py:local --workdir=/tmp/f  # seconds
  # The paper's pairs and recipe (SGD, batch 64), 30 epochs instead of 240, on a GPU:
  python -m launch.main --config=configs/fashion_mnist.py:pair=resnet32x4,seeds=3 \
      --workdir=workdir/fmnist_rn32x4

Variants (``fashion_mnist.py:key=value,...``):

* ``default``: every method, with BatchNorm re-estimation for InherNet.
* ``bn``: BatchNorm re-estimation measured: scratch and InherNet plain / data-aware x
  with / without re-estimation (``recalibrate``).
* ``local``: every code path in seconds, for tests (tiny widths, 512 images).
* ``pair=P`` (P a key of `configs.cifar100.PAIRS`, e.g. resnet32x4, wrn_40_2, vgg13,
  resnet56, resnet110): the CIFAR-100 comparison of `configs/cifar100.py` (the paper's
  teacher -> student pair, InherNet-Small + KD and InherNet-Large, SGD 0.05 / momentum
  0.9 / weight decay 5e-4 / batch 64, lr x0.1 at 5/8, 3/4 and 7/8 of training, as the
  paper's 150/180/210 of 240) on all 60,000 Fashion-MNIST images. Shortened to 30
  epochs by default (``epochs``): Fashion-MNIST is 10 classes of 28x28 grey images, and
  30 epochs is what one GPU session affords per pair; the teacher trains as long.

Arguments: ``variant``, ``pair``, ``seeds``, ``epochs`` (of every method),
``teacher_epochs``, ``train_examples`` (training images used; 0: all 60,000). Their
defaults depend on the variant (`DEFAULTS`).
"""

import ml_collections

from configs import cifar100
from configs import common

TEACHER = ("resnet8", (16, 16, 32, 64))
STUDENT = ("resnet8", (8, 8, 16, 32))
# variant -> (seeds, epochs, teacher_epochs, train_examples); 0 examples: all 60,000.
DEFAULTS = {"default": (3, 3, 8, 12000), "bn": (1, 3, 6, 12000), "local": (1, 1, 1, 512),
            "pair": (1, 30, -1, 0)}  # pair: the teacher trains as long as the methods.
DATA = {"name": "fashion_mnist", "data_dir": "", "augment": True, "pad": 2, "flip": True}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, variant="default", pair="", seeds=-1, epochs=-1,
                         teacher_epochs=-1, train_examples=-1)
  variant = "pair" if arg.pair else arg.variant
  if arg.pair and arg.variant != "default":
    raise ValueError(f"fashion_mnist.py: pair={arg.pair!r} is a variant of its own; "
                     f"drop variant={arg.variant!r}")
  if variant not in DEFAULTS or variant == "pair" and not arg.pair:
    raise ValueError(f"fashion_mnist.py: unknown variant {arg.variant!r} "
                     "(default, bn, local, or pair=P)")
  seeds, epochs, teacher_epochs, examples = (
      given if given >= 0 else default for given, default in zip(
          (arg.seeds, arg.epochs, arg.teacher_epochs, arg.train_examples), DEFAULTS[variant]))
  if variant == "pair":
    c = _pair(arg.pair, seeds, epochs, epochs if teacher_epochs < 0 else teacher_epochs)
  else:
    c = _resnet8(variant, seeds, epochs, teacher_epochs)
  if examples > 0:
    c.data.train_examples = examples
  return c


def _pair(pair: str, seeds: int, epochs: int, teacher_epochs: int):
  """The CIFAR-100 config of ``pair`` (its models, methods, recipe) on Fashion-MNIST."""
  c = cifar100.get_config(f"pair={pair},seeds={seeds},epochs={epochs}")
  c.name = c.name.replace("CIFAR-100", "Fashion-MNIST")
  c.data = ml_collections.ConfigDict(DATA)
  c.teacher.epochs = teacher_epochs
  c.progress = False
  return c


def _resnet8(variant: str, seeds: int, epochs: int, teacher_epochs: int):
  c = common.base()
  c.name = "fashion_mnist: resnet8 teacher -> resnet8/2 student / InherNet"
  c.seeds = seeds
  c.data = ml_collections.ConfigDict(DATA)
  c.batch_size = 128
  c.eval_batch_size = 500
  c.epochs = epochs
  c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3,
                                           "schedule": "constant"})
  c.checkpoint_every_steps = 200
  c.progress = False
  c.teacher = ml_collections.ConfigDict({
      "model": TEACHER[0], "kwargs": {"num_filters": TEACHER[1]}, "epochs": teacher_epochs,
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
  if variant == "bn":
    c.methods = "student,inherit_plain,inherit,inherit_aware_plain,inherit_aware"
  elif variant == "local":  # Every code path in seconds: for tests.
    c.teacher.kwargs = {"num_filters": (8, 8, 16, 16)}
    for name in ("student", "student_kd", "student_dkd", "student_fitnet"):
      c.method_defs[name].kwargs = {"num_filters": (4, 4, 8, 8)}
    c.methods = "student,inherit_plain,inherit,inherit_aware"
    c.batch_size = 32
    c.checkpoint_every_steps = 10
  return c

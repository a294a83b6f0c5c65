r"""CIFAR-100, the paper's teacher -> student pairs (RepDistiller naming) and InherNet ranks.

The paper's setting: SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, 240
epochs, lr x0.1 at epochs 150/180/210; three heads. InherNet-Small (its "Small" rank) is
fine-tuned with KD from its teacher, InherNet-Large with the plain task loss. Students:
from scratch, with KD (alpha 0.1 CE + 0.9 KL at T=4, RepDistiller's) and with DKD.

Needs CIFAR-100 prepared for tensorflow-datasets (no download at run time):
``tfds build cifar100 --data_dir=DIR --file_format=array_record`` on a machine with
network, then ``--config.data.data_dir=DIR``.

  python -m launch.main --config=configs/cifar100.py:pair=resnet32x4 \
      --config.data.data_dir=$HOME/tensorflow_datasets --workdir=gs://.../rn32x4
  python -m launch.main --config=configs/cifar100.py:pair=wrn_40_2-wrn_16_2,seeds=3 ...
  # A teacher trained elsewhere (a run directory of this launcher):
  python -m launch.main --config=configs/cifar100.py:pair=resnet56 \
      --config.teacher.checkpoint=/path/to/seed_0/teacher --workdir=...

Arguments: ``pair`` (a key of PAIRS), ``seeds`` (default 1), ``epochs`` (default 240; the
lr drops scale with it).
"""

import ml_collections

from configs import common

# pair -> (teacher, student, InherNet-Small rank, InherNet-Large rank), from the paper.
PAIRS = {
    "resnet32x4": ("resnet32x4", "resnet8x4", 4, 8),
    "vgg13": ("vgg13", "vgg8", 128, 256),
    "wrn_40_2": ("wrn_40_2", "wrn_40_1", 16, 32),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2", 16, 32),
    "resnet56": ("resnet56", "resnet20", 8, 16),
    "resnet110": ("resnet110", "resnet32", 8, 32),
    "resnet110-resnet20": ("resnet110", "resnet20", 4, 8),
}


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, pair="resnet32x4", seeds=1, epochs=240)
  if arg.pair not in PAIRS:
    raise ValueError(f"cifar100.py: unknown pair {arg.pair!r}; known: {sorted(PAIRS)}")
  teacher, student, small, large = PAIRS[arg.pair]
  c = common.base()
  c.name = f"CIFAR-100: {teacher} -> {student} / InherNet r={small},{large}"
  c.seeds = arg.seeds
  c.data = ml_collections.ConfigDict({"name": "cifar100", "data_dir": "", "augment": True})
  c.batch_size = 64
  c.eval_batch_size = 500
  c.epochs = arg.epochs
  scale = arg.epochs / 240
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
      "weight_decay_mask": "all", "schedule": "step", "decay_factor": 0.1,
      "decay_epochs": tuple(round(e * scale) for e in (150, 180, 210)),
  })
  c.checkpoint_every_steps = 2000
  c.teacher = ml_collections.ConfigDict(
      {"model": teacher, "kwargs": {}, "epochs": arg.epochs, "checkpoint": ""})
  kd = {"alpha": 0.1, "temperature": 4.0}
  student_def = {"kind": "student", "model": student, "kwargs": {}}
  inherit_def = {"kind": "inhernet", "heads": 3, "preset": "default"}
  c.method_defs = {
      "student": {**student_def, "loss": "ce", "label": f"{student} from scratch"},
      "student_kd": {**student_def, "loss": "kd", "loss_kwargs": kd, "label": f"{student} + KD"},
      "student_dkd": {**student_def, "loss": "dkd", "label": f"{student} + DKD",
                      # mdistiller's DKD: CE + a weight warmed up over 20 of 240
                      # epochs (scaled with the run's epochs).
                      "loss_kwargs": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0,
                                      "ce_weight": 1.0, "warmup_epochs": 20 * scale}},
      "inherit_small": {**inherit_def, "rank": small, "loss": "kd", "loss_kwargs": kd,
                        "label": f"InherNet-Small r={small} + KD"},
      "inherit_large": {**inherit_def, "rank": large, "loss": "ce",
                        "label": f"InherNet-Large r={large}"},
  }
  c.methods = "student,student_kd,student_dkd,inherit_small,inherit_large"
  return c

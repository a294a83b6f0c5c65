r"""ImageNet: ResNet-50 teacher -> ResNet-18 student / InherNet at ResNet-18's size.

Standard ResNet recipe: SGD momentum 0.9, lr 0.1 x batch/256, weight decay 1e-4 (not on
BatchNorm or biases), 5 warmup epochs then cosine, 90 epochs (100 in big_vision's
setting; change with ``epochs=``), batch 1024, bf16 compute. InherNet inherits every
conv inside the blocks (stem and classifier kept) at the largest rank whose network has
no more parameters than ResNet-18 (11.69M), 3 heads.

Needs imagenet2012 prepared for tensorflow-datasets (manual download of the ILSVRC2012
tars into DIR/downloads/manual/, then ``tfds build imagenet2012 --data_dir=DIR
--file_format=array_record``). A trained teacher avoids 90 epochs of ResNet-50:
``--config.teacher.checkpoint=RUN_DIR`` (a run directory of this launcher).

  python -m launch.main --config=configs/imagenet.py --config.data.data_dir=DIR \
      --config.teacher.checkpoint=/ckpt/resnet50_run --workdir=/runs/imagenet

Arguments: ``seeds`` (default 1), ``epochs`` (default 90), ``batch`` (default 1024).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, seeds=1, epochs=90, batch=1024)
  c = common.base()
  c.name = "ImageNet: resnet50 -> resnet18 / InherNet at resnet18's size"
  common.imagenet_run(c, arg, eval_batch_size=500)
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd", "learning_rate": 0.1 * arg.batch / 256, "momentum": 0.9,
      "nesterov": False, "weight_decay": 1e-4, "weight_decay_mask": "kernels",
      "schedule": "cosine", "warmup_epochs": 5,
  })
  c.teacher = ml_collections.ConfigDict(
      {"model": "resnet50", "kwargs": {}, "epochs": arg.epochs, "checkpoint": ""})
  kd = {"alpha": 0.5, "temperature": 1.0}
  c.method_defs = common.student_and_inherit_methods("resnet18", {}, heads=3, kd=kd)
  c.methods = "student,student_kd,inherit,inherit_kd"
  return c

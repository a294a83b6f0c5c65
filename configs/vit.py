r"""ImageNet: ViT-B/16 teacher -> ViT-S/16 student / InherNet at ViT-S's size.

DeiT-style recipe: AdamW (lr 5e-4 x batch/512, weight decay 0.05 on kernels), 5 warmup
epochs then cosine, gradient clipping at 1.0, bf16 compute, 300 epochs (``epochs=``).
InherNet inherits every Dense inside the blocks (patch embedding, position embeddings
and head kept) at the largest rank whose network has no more parameters than ViT-S
(22.1M), 2 heads. The blocks are one ``nn.scan`` (stacked layer axis), so inheritance
decomposes each kernel kind of all 12 layers in one batched SVD.

Sharding: tensor parallel over ``model`` (Megatron-style attention/MLP split, see
`inhernet_jax.parallel.sharding.TENSOR_PARALLEL_RULES`), data parallel over the rest. One host
with 8 GPUs, or a TPU v4-32 pod slice (16 chips: 4 hosts x 4)::

  python -m launch.main --config=configs/vit.py --config.data.data_dir=DIR \
      --config.mesh.model=2 --workdir=/runs/vit
  TPU_NAME=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh configs/vit.py \
      gs://bucket/runs/vit --config.data.data_dir=gs://bucket/tfds --config.mesh.fsdp=4

Needs imagenet2012 prepared for tensorflow-datasets (see configs/imagenet.py).

Arguments: ``seeds`` (default 1), ``epochs`` (default 300), ``batch`` (default 1024),
``model`` (tensor-parallel ways, default 1).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, seeds=1, epochs=300, batch=1024, model=1)
  c = common.base()
  c.name = "ImageNet: vit_b16 -> vit_s16 / InherNet at vit_s16's size"
  common.imagenet_run(c, arg, eval_batch_size=512)
  c.mesh.model = arg.model
  c.sharding_rules = "tensor_parallel"
  c.optimizer = ml_collections.ConfigDict({
      "name": "adamw", "learning_rate": 5e-4 * arg.batch / 512, "weight_decay": 0.05,
      "weight_decay_mask": "kernels", "schedule": "cosine", "warmup_epochs": 5,
      "grad_clip_norm": 1.0,
  })
  vit = {"scan": True, "dropout_rate": 0.0}
  c.teacher = ml_collections.ConfigDict(
      {"model": "vit_b16", "kwargs": vit, "epochs": arg.epochs, "checkpoint": ""})
  kd = {"alpha": 0.5, "temperature": 1.0}
  c.method_defs = common.student_and_inherit_methods("vit_s16", vit, heads=2, kd=kd)
  c.methods = "student,student_kd,inherit,inherit_kd"
  return c

"""Model zoo: every model is the teacher (``spec=None``) and the inherited network.

All convs and denses are `InherConv` / `InherDense`, so ``model.clone(spec=s)`` is the
inherited architecture and its ``init`` has exactly the tree of
``inherit(teacher_params, s)``. Names follow the standard references: RepDistiller's
CIFAR models (`cifar`), torchvision's ImageNet ResNets (`imagenet`), EfficientNet-Lite0
(`efficientnet`, of the ImageNet family), big_vision's ViT, a BERT-style encoder and a
GPT-2-style decoder (`transformer`), and small digits models (`small`).

Example:
  ```python
  teacher = models.create("resnet32x4", num_classes=100)
  rules = models.preset("default", "resnet32x4")          # stem and classifier kept
  spec = InherSpec(rank=8, heads=3, rules=rules)
  student = teacher.clone(spec=spec)
  size = models.param_count("resnet8x4", num_classes=100)  # "same size as resnet8x4"
  ```
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from inhernet_jax.decomposition import accounting
from inhernet_jax.models import cifar, efficientnet, imagenet, small, transformer

# name -> (family, constructor); EfficientNet-Lite is an ImageNet model (224 x 224, 1000).
_FAMILIES = {"cifar": (cifar,), "imagenet": (imagenet, efficientnet), "small": (small,),
             "transformer": (transformer,)}
_REGISTRY = {
    name: (family, ctor)
    for family, modules in _FAMILIES.items()
    for module in modules
    for name, ctor in module.MODELS.items()
}
NAMES = tuple(_REGISTRY)
_DEFAULT_CLASSES = {"cifar": 100, "imagenet": 1000, "small": 10}  # Transformers: own defaults.
_LM = ("gpt2_small",)
_TOKENS = ("bert_base", "gpt2_small")


def create(name: str, num_classes: int | None = None, **kwargs):
  """The model ``name`` (see `NAMES`); keyword arguments override its fields.

  ``num_classes`` is the classifier size (the LM's vocabulary size for ``gpt2_small``);
  by default 100 for the CIFAR models, 1000 for ImageNet, 10 for digits.
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
  if num_classes is None:
    num_classes = _DEFAULT_CLASSES.get(_REGISTRY[name][0])
  if num_classes is not None:
    kwargs["vocab_size" if name in _LM else "num_classes"] = num_classes
  return _REGISTRY[name][1](**kwargs)


def family(name: str) -> str:
  """``"cifar"``, ``"imagenet"``, ``"small"`` or ``"transformer"``."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
  return _REGISTRY[name][0]


def example_input(name: str, batch: int = 1) -> jax.ShapeDtypeStruct:
  """The input the model expects (its standard resolution or a short token sequence)."""
  fam = family(name)
  if name in _TOKENS:
    return jax.ShapeDtypeStruct((batch, 16), jnp.int32)
  if fam == "cifar":
    return jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.float32)
  if fam == "small":
    return jax.ShapeDtypeStruct((batch, 8, 8, 1), jnp.float32)
  return jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)


def variable_shapes(model, name: str):
  """``jax.eval_shape`` of ``model.init`` on `example_input` (nothing is computed)."""
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), example_input(name)
  )


def param_count(name: str, num_classes: int | None = None, spec=None, **kwargs) -> int:
  """Parameters of a named model (optionally inherited with ``spec``), via eval_shape."""
  model = create(name, num_classes, spec=spec, **kwargs)
  return accounting.param_count(variable_shapes(model, name)["params"])


def forward_flops(name: str, num_classes: int | None = None, spec=None, batch: int = 1, **kwargs) -> float:
  """FLOPs of one eval-mode forward of a named model at `example_input` (XLA's count)."""
  model = create(name, num_classes, spec=spec, **kwargs)
  variables = variable_shapes(model, name)
  apply = lambda v, x: model.apply(v, x, train=False)
  return accounting.forward_flops(apply, variables, example_input(name, batch))


PRESETS = ("default", "demo", "all")


def preset(which: str, name: str) -> tuple:
  """Which layers are inherited, as rules for `InherSpec`.

  * ``default``: every conv/dense inside the blocks; stem, classifier and embeddings
    (and BERT's pooler) kept.
  * ``demo``: every conv including the stem, classifier kept (the public demo).
  * ``all``: everything with a kernel.

  EfficientNet-Lite's depthwise (grouped) convs are kept by every preset
  (`efficientnet.DEPTHWISE_RULE`, first): `InherConv` cannot factorise a grouped conv,
  and per group a depthwise kernel is a ``k*k x 1`` matrix (rank 1).
  """
  if which not in PRESETS:
    raise ValueError(f"unknown preset {which!r}; known: {PRESETS}")
  fam = family(name)
  if name in efficientnet.MODELS:
    rules = (efficientnet.DEPTHWISE_RULE,)
    if which == "all":
      return rules
    if which == "demo":
      return (*rules, (r"head/kernel", "skip"))
    return (*rules, (r"stem/kernel", "skip"), (r"head/kernel", "skip"))
  if which == "all":
    return ()
  if which == "demo":
    return ((r"head/kernel", "skip"),)
  if fam == "transformer":
    # Empty action: the spec's own rank policy; everything outside the blocks is kept.
    return ((r"(block_\d+|blocks)/.*", {}), (r".*", "skip"))
  if name == "mlp":
    return ((r"head/kernel", "skip"),)
  return ((r"stem/kernel", "skip"), (r"head/kernel", "skip"))


__all__ = [
    "NAMES",
    "PRESETS",
    "create",
    "example_input",
    "family",
    "forward_flops",
    "param_count",
    "preset",
    "variable_shapes",
]

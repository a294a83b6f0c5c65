r"""PyTorch weights -> this package's Flax variables: torchvision ResNets, HF ViT and BERT.

A converted teacher is the model of `inhernet_jax.models` with ``spec=None`` and its
variables, so it goes straight into `inhernet_jax.inherit`. Conversion is strict, in two
steps, each with a readable error that names every offending key:

1. PyTorch names -> our paths (`torchvision_resnet`, `hf_vit`, `hf_bert`): every tensor
   the model needs must be there, and every tensor that is there must be used, except
   those matched by ``ignore`` (regexes on PyTorch names; `DEFAULT_IGNORE` drops
   BatchNorm's ``num_batches_tracked`` and well-known unused heads, see there).
2. our paths -> the model (`match_variables`): the converted tree must have exactly the
   paths and shapes of the model's own ``jax.eval_shape(model.init ...)``; mismatches
   name the PyTorch tensor each path came from.

Layouts: conv weights ``(out, in, kh, kw)`` become ``(kh, kw, in, out)`` kernels, Linear
``(out, in)`` becomes ``(in, out)``, BatchNorm ``weight``/``bias`` the ``scale``/``bias``
params and ``running_mean``/``running_var`` the ``batch_stats`` ``mean``/``var``. Images
are NHWC here (NCHW in PyTorch). Hugging Face checkpoints may use the transformers-4
names (``vit.encoder.layer.0.attention.attention.query.weight``, the Hub's files) or
the transformers-5 ones (``vit.layers.0.attention.q_proj.weight``), with or without the
base-model prefix (``vit.`` / ``bert.``: ``ViTModel`` / ``BertModel`` files have none).

Checkpoints without a classifier (``ViTModel``, ``BertModel``, ``BertForPreTraining``)
are refused (the ``head`` is reported missing) unless ``init_head=True``, which adds a
zero-initialised head of the config's ``num_labels`` outputs (big_vision's init for
fine-tuning; `models.preset` keeps the head un-factorised anyway).

Example:
  ```python
  model, variables = convert.from_torchvision("resnet50.pth", "resnet50")
  model, variables = convert.from_hf("vit-base-patch16-224/")   # model.safetensors + config.json
  spec = InherSpec(rank=0.25, heads=3, rules=models.preset("default", "resnet50"))
  student = model.clone(spec=spec)
  logits = student.apply({**variables, "params": inherit(variables["params"], spec)},
                         images_nhwc, train=False)
  ```
"""

from __future__ import annotations

# The public face: the machinery lives in convert_core, each family in its own module.
from inhernet_jax.interop.checks import ConversionError, check_hf_config
from inhernet_jax.interop.state_dict import (DEFAULT_IGNORE, abstract_variables, batch_norm_leaves,
                                       conv_leaves, load_state_dict, match_variables)
from inhernet_jax.interop.hf import (HF_KINDS, from_hf, hf_bert, hf_example_input, hf_model,
                                     hf_vit, read_hf_config)
from inhernet_jax.interop.resnet import from_torchvision, torchvision_resnet

__all__ = [
    "DEFAULT_IGNORE",
    "HF_KINDS",
    "ConversionError",
    "abstract_variables",
    "batch_norm_leaves",
    "conv_leaves",
    "from_hf",
    "from_torchvision",
    "hf_bert",
    "hf_example_input",
    "hf_model",
    "hf_vit",
    "check_hf_config",
    "load_state_dict",
    "match_variables",
    "read_hf_config",
    "torchvision_resnet",
]


"""Weights in and out: PyTorch and Hugging Face checkpoints -> Flax (`convert`, the
public face, over `state_dict`, `checks`, `resnet`, `hf`, `efficientnet`), the
sentence-transformers encoder (`sentence`), and inherited networks exported as
safetensors + spec.json (`export`).

May import: `inhernet_jax.models`, `inhernet_jax.layers`, `inhernet_jax.decomposition`,
`inhernet_jax.training` (checkpoints), `inhernet_jax.common`.
"""

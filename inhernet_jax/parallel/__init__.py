"""Many devices and many hosts: meshes, path rules -> `NamedSharding`s, global
batches (`sharding`) and the `jax.distributed` start-up of TPU pods and GPU clusters
(`distributed`).

May import: `inhernet_jax.common`.
"""

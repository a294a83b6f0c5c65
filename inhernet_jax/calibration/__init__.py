"""Running a model on calibration data: the per-kernel input Grams of data-aware
inheritance (`grams`) and BatchNorm statistics re-estimated after inheritance
(`batch_stats`).

May import: `inhernet_jax.decomposition`, `inhernet_jax.common`.
"""

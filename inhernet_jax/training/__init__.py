"""Training a network: the trainer (`trainer`: `TrainState`, jitted steps, set-up,
fingerprint) and its loop (`loop`), optimisers and schedules (`optim`, optax), losses
(`losses`: CE, KD, DKD, FitNet hints), orbax checkpoints (`checkpoint`), state checksums
(`integrity`), one writer per workdir (`lock`) and the progress bar (`progress`).

May import: `inhernet_jax.layers`, `inhernet_jax.parallel`, `inhernet_jax.common`.
"""

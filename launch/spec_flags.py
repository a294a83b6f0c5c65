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
from inhernet_jax.experiment import preflight
from . import cli

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
HEADS = flags.DEFINE_integer("heads", cli.DEFAULT_HEADS, "Gated expert up-projections H.")
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


def check(teacher_shapes=None, name: str | None = None, num_classes: int | None = None,
          *, required: bool = True) -> None:
  """The flags checked before anything is loaded: exactly one of ``--rank``, ``--energy``
  and ``--budget`` (at most one unless ``required``), each readable, ``--heads`` and
  ``--rank_multiple`` >= 1; with the teacher's ``teacher_shapes`` (abstract params of zoo
  model ``name``) also a named size or budget smaller than the teacher and a rank that
  inherits at least one layer.

  Raises:
    app.UsageError: naming the flag and what was expected.
  """
  given_flags = given()
  if len(given_flags) > 1 or (required and not given_flags):
    raise app.UsageError(
        f"give {'exactly' if required else 'at most'} one of --rank, --energy and --budget "
        f"(got {', '.join(given_flags) or 'none'})"
        + ("" if required else "; none: only convert"))
  if HEADS.value < 1:
    raise app.UsageError(
        f"--heads={HEADS.value}: expected an int >= 1 (gated expert up-projections)")
  if RANK_MULTIPLE.value < 1:
    raise app.UsageError(f"--rank_multiple={RANK_MULTIPLE.value}: expected an int >= 1")
  if ENERGY.value is not None and not 0.0 < ENERGY.value <= 1.0:
    raise app.UsageError(f"--energy={ENERGY.value}: expected a fraction in (0, 1] of each "
                         "layer's spectral energy")
  for flag in (RANK, BUDGET):
    if flag.value is None:
      continue
    value = flag.value.strip()
    if sizes.is_name(value):
      try:
        sizes.named_size(value, num_classes=num_classes, where=f"--{flag.name}")
      except ValueError as e:
        raise app.UsageError(str(e)) from None
      continue
    try:
      number = int(value) if value.isdigit() else float(value)
    except ValueError:
      number = None
    if number is None or not (number >= 1 if isinstance(number, int) else 0.0 < number <= 1.0):
      raise app.UsageError(f"--{flag.name}={flag.value!r}: expected an int >= 1, a fraction in "
                           "(0, 1] or student:<zoo model>")
  if teacher_shapes is None or not given_flags or ENERGY.value is not None:
    return
  teacher_count = accounting.param_count(teacher_shapes)
  flag = RANK if RANK.value is not None else BUDGET
  if sizes.is_name(flag.value) or flag is BUDGET:
    try:
      target = sizes.parameter_budget(teacher_shapes, flag.value, num_classes=num_classes,
                                      where=f"--{flag.name}")
    except (TypeError, ValueError) as e:
      raise app.UsageError(f"--{flag.name}={flag.value!r}: {e}") from None
    if target >= teacher_count:
      raise app.UsageError(
          f"--{flag.name}={flag.value}: {target:,} parameters are not fewer than the "
          f"teacher's {teacher_count:,}: nothing to compress; expected a smaller size")
    if flag is BUDGET:
      return
  no_layer(_rank_spec(teacher_shapes, name, num_classes), teacher_shapes)


def no_layer(spec: InherSpec, teacher_params) -> None:
  """Refuses a spec that inherits no layer (the run would be the teacher itself).

  Raises:
    app.UsageError: naming the flag.
  """
  problems = preflight.validate._Problems()  # pylint: disable=protected-access
  preflight.inherits_a_layer(problems, "the spec", teacher_params, spec,
                             accounting.param_count(teacher_params))
  if problems:
    flag = next(f"--{f.name}={f.value}" for f in (RANK, ENERGY, BUDGET) if f.value is not None)
    raise app.UsageError(f"{flag}: {problems[0].split(': ', 1)[1]}")


def make_spec(teacher_params, name: str, num_classes: int | None) -> InherSpec:
  """The flags' `InherSpec` for a teacher of zoo model ``name`` (whose presets apply),
  with the ``--svd`` setting.

  Raises:
    app.UsageError: naming the flag and what was expected.
  """
  check(required=False)
  spec = _rank_spec(teacher_params, name, num_classes)
  no_layer(spec, teacher_params)
  return spec.replace(**SVD_SETTINGS[SVD.value])


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
    try:
      rank = accounting.rank_for_params(teacher_params, target, heads=heads, rules=rules,
                                        rank_multiple=multiple)
    except ValueError as e:
      raise app.UsageError(f"--rank={rank} with --heads={heads}: {e}") from None
    return InherSpec(rank=rank, heads=heads, rules=rules, rank_multiple=multiple)
  try:
    value = int(rank) if rank.isdigit() else float(rank)
    return InherSpec(rank=value, heads=heads, rules=rules, rank_multiple=multiple)
  except (TypeError, ValueError) as e:
    raise app.UsageError(f"--rank={rank!r}: expected an int >= 1, a fraction in (0, 1] or "
                         f"student:<zoo model> ({e})") from None


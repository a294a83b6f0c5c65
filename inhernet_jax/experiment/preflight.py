"""The whole experiment checked before anything trains, loads or logs: `check_run`.

`validate.check_config` reads the fields; `check_run` also builds what they describe,
without computing anything: the mesh on this job's devices, every model (shapes only,
`jax.eval_shape`), every InherNet method's spec on the teacher's shapes, the FitNet hint
layers, the input pipeline at the config's batch size, and the workdir (written to and
cleaned). A typo in a model's ``kwargs``, ``widths=(0, 0, 0)``, ``heads=100000``, a rank
that inherits nothing, a hint naming a missing layer, ``mesh.data=3`` on one device or
``batch_size`` above the dataset are one `validate.ConfigError` naming the field, not a
traceback after the teacher has trained.

Example:
  ```python
  preflight.check_run(config, "/tmp/run")   # ConfigError naming every offending field
  ```
"""

from __future__ import annotations

import functools
import os
import tempfile

import jax
import jax.numpy as jnp

from inhernet_jax import models
from inhernet_jax.data import pipeline as data_lib
from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition.spec import VARIANTS, InherSpec
from inhernet_jax.decomposition.transform import resolve
from inhernet_jax.experiment import validate
from inhernet_jax.experiment.records import MethodDef
from inhernet_jax.models import sizes
from inhernet_jax.parallel import sharding as sharding_lib

ConfigError = validate.ConfigError
_dict = validate._dict  # pylint: disable=protected-access
_default = MethodDef.default


def _problems():
  return validate._Problems()  # pylint: disable=protected-access


def _example(config) -> jax.ShapeDtypeStruct:
  dtype = jnp.int32 if config.data.get("name") == "chars" else jnp.float32
  return jax.ShapeDtypeStruct((1, *data_lib.input_shape(config.data)), dtype)


def build_model(p, where: str, name: str, kwargs, num_classes: int, x):
  """``(model, abstract variables)`` of zoo model ``name`` for input ``x`` (a
  `jax.ShapeDtypeStruct`); ``(None, None)`` when it cannot be built (the reason, naming
  ``where``, appended to the problems ``p``)."""
  kwargs = _dict(kwargs)
  model = p.call(f"{where}.kwargs", models.create, name, num_classes=num_classes, **kwargs)
  if model is None:
    return None, None
  try:
    return model, jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  except Exception as e:  # noqa: BLE001 (any failure of a user's architecture is its config's)
    p.append(f"{where}.kwargs: {name} with {kwargs} cannot be built "
             f"({type(e).__name__}: {_line(e)})")
    return model, None


def _line(e: BaseException) -> str:
  return "; ".join(l.strip() for l in str(e).splitlines() if l.strip()) or type(e).__name__


def _has_layer(model, variables, x, layer: str) -> bool:
  def probe(v, x):
    _, state = model.apply(
        v, x, train=False, mutable=["intermediates"],
        capture_intermediates=lambda m, method: method == "__call__" and "/".join(m.path) == layer)
    return state.get("intermediates", {})

  node = jax.eval_shape(probe, variables, x)
  for part in layer.split("/"):
    if part not in node:
      return False
    node = node[part]
  return "__call__" in node


def _check_hint(p, where: str, md, student, teacher, x) -> None:
  h = _dict(md.get("hint"))
  for side, (model, variables) in (("student_layer", student), ("teacher_layer", teacher)):
    layer = h.get(side)
    if variables is None or not isinstance(layer, str):
      continue
    if not _has_layer(model, variables, x, layer):
      p.append(f"{where}.hint.{side}: no layer {layer!r} in the {side.split('_')[0]} "
               f"({type(model).__name__}); expected a module path such as one of "
               f"{sorted(variables['params'])}")


def inherits_a_layer(p, where: str, t_params, spec: InherSpec, teacher_count: int) -> None:
  """Refuses a spec that inherits no layer (every rank at or above its layer's full rank,
  or factorising saves nothing at these heads)."""
  try:
    exact = resolve(t_params, spec)
  except (TypeError, ValueError) as e:
    p.append(f"{where}: {_line(e)}")
    return
  planned = exact.rules[:len(exact.rules) - len(spec.rules)]
  if not any(isinstance(a, (dict, tuple)) and "rank" in dict(a) for _, a in planned):
    p.append(f"{where}: inherits no layer of the teacher (at heads={spec.heads} each layer "
             f"is kept dense: the rank is at or above its full rank, or factorising it "
             f"saves nothing), so the result would be the teacher itself at "
             f"{teacher_count:,} parameters; expected a smaller rank or fewer heads")


def _check_inhernet(p, config, name: str, md, t_params, student_params, num_classes,
                    failed=()) -> None:
  where = f"config.method_defs.{name}"
  teacher_count = accounting.param_count(t_params)
  rules = p.call(f"{where}.preset", models.preset, md.get("preset", _default("preset")),
                 config.teacher.model)
  if rules is None:
    return
  sweep = _dict(config.get("sweep"))
  swept = md.get("sweep", _default("sweep"))
  ranks = (sweep.get("ranks") or (md.get("rank"),)) if swept else (md.get("rank"),)
  heads_list = (sweep.get("heads") or (md.get("heads", _default("heads")),)) if swept else (
      md.get("heads", _default("heads")),)
  allocation = md.get("allocation", _default("allocation"))
  variant = md.get("variant", _default("variant"))
  if variant not in VARIANTS:
    return  # Reported by check_config.
  for raw in ranks:
    try:
      rank = validate.parse_rank(raw, f"{where}.rank")
    except ConfigError:
      continue  # Reported by check_config.
    if isinstance(rank, str) and rank.partition(":")[2].strip() in failed:
      continue  # Its student could not be built (reported).
    for heads in heads_list:
      at = f"{where} (rank {rank!r}, heads={heads})"
      target = None
      if allocation == "greedy" or sizes.is_name(rank):
        target = p.call(f"{where}.rank", functools.partial(
            sizes.parameter_budget, where=f"{where}.rank"), t_params, rank,
                        methods=student_params, num_classes=num_classes)
        if target is None:
          continue
        if target >= teacher_count:
          p.append(f"{where}.rank {rank!r}: {target:,} parameters are not fewer than the "
                   f"teacher's {teacher_count:,}: nothing to compress; expected a smaller size")
          continue
        rank = p.call(at, accounting.rank_for_params, t_params, target, heads=heads, rules=rules,
                      variant=variant)
        if rank is None or allocation == "greedy":
          continue
      spec = p.call(at, InherSpec, rank=rank, heads=heads, rules=rules, variant=variant)
      if spec is not None:
        inherits_a_layer(p, at, t_params, spec, teacher_count)


def check_models(p, config) -> None:
  """Every model of the config built on shapes; InherNet specs and hint layers checked."""
  tc = config.teacher
  try:
    num_classes, x = data_lib.num_classes(config.data), _example(config)
  except (TypeError, ValueError, KeyError) as e:
    p.append(f"config.data: {_line(e)}")
    return
  teacher = build_model(p, "config.teacher", tc.model, tc.get("kwargs"), num_classes, x)
  defs = config.method_defs
  names = [n.strip() for n in str(config.methods).split(",") if n.strip()]
  student_params, students = {}, {}
  for name in names:
    md = _dict(defs[name])
    if md.get("kind") == "student":
      students[name] = build_model(p, f"config.method_defs.{name}", md.get("model"),
                                   md.get("kwargs"), num_classes, x)
      if students[name][1] is not None:
        student_params[name] = accounting.param_count(students[name][1]["params"])
  if teacher[1] is None:
    return
  for name in names:
    md = _dict(defs[name])
    if md.get("loss") == "fitnet":
      student = students.get(name, teacher)  # An InherNet keeps the teacher's module paths.
      _check_hint(p, f"config.method_defs.{name}", md, student, teacher, x)
    if md.get("kind") == "inhernet":
      _check_inhernet(p, config, name, md, teacher[1]["params"], student_params, num_classes,
                      failed={n for n, (_, v) in students.items() if v is None})


def check_data(p, config, mesh) -> None:
  """The input pipeline at the config's batch sizes on ``mesh`` (this process's slot)."""
  bs = config.batch_size
  ebs = config.get("eval_batch_size") or bs
  try:
    slot, slots = sharding_lib.process_batch_slot(mesh, bs)
    if sharding_lib.process_batch_slot(mesh, ebs) != (slot, slots):
      raise ValueError(f"eval_batch_size={ebs} and batch_size={bs} split differently over "
                       f"mesh {sharding_lib.describe(mesh)}")
  except ValueError as e:
    p.append(f"config.batch_size={bs}: {_line(e)}")
    return
  name = config.data.get("name")
  try:
    data_lib.get(config.data, batch_size=bs, seed=config.seed, eval_batch_size=ebs,
                 process_index=slot, process_count=slots)
  except ModuleNotFoundError as e:
    p.append(f"config.data.name={name!r} needs the optional package {e.name!r}: install the "
             "data extra, pip install 'inhernet-jax[data]'")
  except (TypeError, ValueError, OSError, ImportError) as e:
    text = _line(e).removeprefix("data.get: ")
    field = ("config.eval_batch_size" if "eval_batch_size=" in text else
             "config.batch_size" if "batch_size=" in text else "config.data")
    p.append(f"{field}: {text}")


def check_workdir(path: str, where: str = "--workdir", *, create: bool = True) -> None:
  """``path`` is (or can become) a directory this process can write, with a lock file
  that is a file: checked by writing (and removing) a small file there, or, with
  ``create=False`` and no ``path`` yet, in its nearest existing parent (nothing created).

  Raises:
    ConfigError: naming ``where``, the path and what was expected.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{where}={path}: is a file; expected a directory (or a path to create)")
  lock = os.path.join(path, ".lock")
  if os.path.lexists(lock) and not os.path.isfile(lock):
    raise ConfigError(f"{lock}: is not a regular file; expected the workdir's lock file "
                      "(remove it)")
  probe_dir = path
  while not create and not os.path.isdir(probe_dir):
    parent = os.path.dirname(probe_dir)
    if os.path.exists(probe_dir) or parent == probe_dir:
      raise ConfigError(f"{where}={path}: {probe_dir} is not a directory; expected a path "
                        "whose parents are directories")
    probe_dir = parent
  try:
    os.makedirs(probe_dir, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=probe_dir)
    try:
      os.write(fd, b"\0" * 4096)
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    raise ConfigError(f"{where}={path}: cannot write there ({e.strerror or e}); expected a "
                      "writable directory with free space") from None


def check_run(config, workdir: str | None = None) -> None:
  """`validate.check_config`, then the config built on shapes (see the module docstring),
  then ``workdir`` (created only for a good config).

  Raises:
    ConfigError: listing every offending field.
  """
  validate.check_config(config)
  p = _problems()
  axes = config.get("mesh")
  mesh = p.call("config.mesh", sharding_lib.make_mesh, None if axes is None else _dict(axes))
  check_models(p, config)
  if mesh is not None and not p:
    check_data(p, config, mesh)
  validate._raise(p)  # pylint: disable=protected-access
  if workdir is not None:
    check_workdir(workdir)


__all__ = ["build_model", "check_data", "check_models", "check_run", "check_workdir",
           "inherits_a_layer"]

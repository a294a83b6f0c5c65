"""Meshes, parameter sharding rules and global batches: the SPMD plumbing.

One code path for one CPU, one GPU, a GPU cluster and a TPU pod: the trainer always
runs on a `jax.sharding.Mesh` with the named axes ``data``, ``fsdp`` and ``model``, and
XLA's SPMD partitioner inserts the collectives.

* ``data``: pure data parallelism (parameters replicated).
* ``fsdp``: data parallelism with parameters and optimizer state sharded
  (big_vision's / ZeRO-3 style; the batch is split over it too).
* ``model``: tensor parallelism for the transformers (Megatron-style column/row
  parallel attention and MLP, `TENSOR_PARALLEL_RULES`); the batch is replicated over it.

Parameters are sharded by path rules, data like big_vision's ``tree_map_with_regex``:
``((regex, action), ...)``, the first rule whose regex fully matches the '/'-joined param
path (``blocks/attn/query/up/kernel``) wins. An action is

* ``"replicate"``;
* ``"fsdp"``: shard the largest dimension the ``fsdp`` axis size divides (replicate if
  none does, or the mesh has no ``fsdp`` devices);
* a tuple of mesh axis names (or ``None``, or a tuple of names) for the *trailing*
  dimensions: ``("fsdp", "model")`` on a ``(in, out)`` kernel, and on a scan-stacked
  ``(layers, in, out)`` kernel alike (leading stack axes stay unsharded). A dimension the
  named axes do not divide is an error naming the path.

Optimizer state mirrors the params (optax's ``mu``, ``nu``, ``trace``): a state leaf whose
path ends with a param's path and has its shape gets that param's sharding; every other
leaf (step counters, BatchNorm statistics, a FitNet connector) is replicated.

Example:
  ```python
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2})          # 8 devices -> (4, 2, 1)
  param_sh = sharding.tree_shardings(mesh, params, sharding.DEFAULT_RULES)
  params = sharding.put(params, param_sh)                    # no host gather
  batch = sharding.shard_batch(mesh, pipeline.train_batch(step))
  ```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from inhernet_jax.common import rules as rules_lib
from inhernet_jax.common import utils

AXES = ("data", "fsdp", "model")
# Axes the batch is split over (the model axis sees the whole local batch).
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = ((r".*", "fsdp"),)

# Megatron-style tensor parallelism for `models.transformer`, teacher and inherited alike.
# Column-parallel layers (query/key/value/fc1) split their outputs over ``model``: the
# inherited layer keeps its rank-r down-projection whole and splits the experts' outputs.
# Row-parallel layers (out/fc2) split their inputs: the inherited down-projection is split
# along its input, so the only collective is an all-reduce of the rank-r bottleneck
# (r values per token instead of the layer's full width: InherNet makes TP cheaper).
_COLUMN = r"(.*/)?(query|key|value|fc1)"
_ROW = r"(.*/)?(out|fc2)"
TENSOR_PARALLEL_RULES: Rules = (
    (_COLUMN + r"/kernel", ("fsdp", "model")),
    (_COLUMN + r"/bias", ("model",)),
    (_COLUMN + r"/down/kernel", ("fsdp", None)),
    (_COLUMN + r"/up/kernel", (None, None, "model")),
    (_COLUMN + r"/up/bias", (None, "model")),
    (_ROW + r"/kernel", ("model", "fsdp")),
    (_ROW + r"/down/kernel", ("model", None)),
    (_ROW + r"/up/kernel", (None, None, "fsdp")),
    (r"(.*/)?gate/.*", "replicate"),
    (r".*", "fsdp"),
)

RULE_SETS = {"default": DEFAULT_RULES, "tensor_parallel": TENSOR_PARALLEL_RULES}


# ---------------------------------------------------------------------------- mesh
def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
              *, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, model)`` mesh over all devices (of all processes).

  Args:
    axes: sizes by axis name (a mapping, or ``(name, size)`` pairs like big_vision's
      ``config.mesh``); missing axes have size 1 and one axis may be ``-1``: it takes
      the devices the others leave. Default: ``{"data": -1}`` (pure data parallelism).
    devices: the devices to use (default ``jax.devices()``).

  Raises:
    ValueError: an unknown axis name, more than one ``-1``, or sizes whose product is
      not the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  items = dict(axes.items() if isinstance(axes, Mapping) else (axes or ()))
  if not items:
    items = {"data": -1}
  unknown = sorted(set(items) - set(AXES))
  if unknown:
    raise ValueError(f"mesh: unknown axis name(s) {unknown}; the axes are {list(AXES)}")
  sizes = {}
  for name in AXES:
    size = items.get(name, 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"mesh: axis {name!r} size must be a positive int or -1, got {size!r}")
    sizes[name] = int(size)
  fill = [n for n, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {fill}")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes "
                       f"{ {n: s for n, s in sizes.items() if s != -1} } (product {known})")
    sizes[fill[0]] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh: axis sizes {sizes} need {int(np.prod(list(sizes.values())))} "
                     f"devices, there are {len(devices)}")
  # Auto axes: shardings are annotations and XLA's partitioner chooses the collectives
  # (the models need no sharding-aware code).
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(tuple(sizes[n] for n in AXES), AXES, axis_types=auto,
                       devices=devices)


def describe(mesh: Mesh) -> str:
  """``"data=4 fsdp=2 model=1 (8 devices, 1 process)"``."""
  shape = " ".join(f"{n}={s}" for n, s in mesh.shape.items())
  if isinstance(mesh, jax.sharding.AbstractMesh):  # Shapes only (planning).
    return f"{shape} (abstract)"
  procs = len({d.process_index for d in mesh.devices.flat})
  return f"{shape} ({mesh.devices.size} devices, {procs} process{'es' if procs > 1 else ''})"


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# --------------------------------------------------------------------------- rules
def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[n] for n in names]))


def _check_action(action: Any, where: str):
  if isinstance(action, list):
    action = tuple(action)
  if isinstance(action, str):
    if action not in ("replicate", "fsdp"):
      raise ValueError(f"{where}: action must be 'replicate', 'fsdp' or a tuple of mesh axes, "
                       f"got {action!r}")
  elif isinstance(action, tuple):
    for entry in action:
      names = () if entry is None else (entry,) if isinstance(entry, str) else entry
      bad = [n for n in names if n not in AXES]
      if bad:
        raise ValueError(f"{where}: unknown mesh axis {bad[0]!r}; the axes are {list(AXES)}")
  else:
    raise TypeError(f"{where}: action must be a str or a tuple, got {action!r}")
  return action


def check_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Validates rules (regexes compile, actions are known) and returns them as tuples."""
  return rules_lib.check_rules(rules, "sharding rules", _check_action)


def resolve_rules(rules: Rules | str | None) -> tuple[tuple[str, Any], ...]:
  """Rules from a config value: None (`DEFAULT_RULES`), a `RULE_SETS` name, or rules."""
  if rules is None:
    return check_rules(DEFAULT_RULES)
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f"sharding rules {rules!r}: expected one of {sorted(RULE_SETS)} "
                       "or a sequence of (regex, action) pairs")
    return check_rules(RULE_SETS[rules])
  return check_rules(rules)


def partition_spec(mesh: Mesh, path: str, shape: Sequence[int], rules: Rules) -> P:
  """The `PartitionSpec` the first matching rule gives a leaf of ``shape`` at ``path``."""
  shape = tuple(int(d) for d in shape)
  i, action = rules_lib.first_match(rules, path)
  if i is None:
    return P()
  pattern = rules[i][0]
  if action == "replicate" or not shape:
    return P()
  if action == "fsdp":
    size = mesh.shape.get("fsdp", 1)
    if size == 1:
      return P()
    # The largest dimension fsdp divides (ties: the last one, usually the output axis).
    best = None
    for i, d in enumerate(shape):
      if d % size == 0 and (best is None or d >= shape[best]):
        best = i
    if best is None:
      return P()
    return P(*([None] * best), "fsdp")
  if len(action) > len(shape):
    raise ValueError(f"{path}: sharding rule {pattern!r} names {len(action)} dimensions "
                     f"{action}, the leaf has shape {shape}")
  spec = (None,) * (len(shape) - len(action)) + tuple(action)
  used = []
  for dim, axes in zip(shape, spec):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    clash = [n for n in names if n in used]
    if clash:
      raise ValueError(f"{path}: sharding rule {pattern!r} uses mesh axis {clash[0]!r} twice")
    used.extend(names)
    size = _axis_size(mesh, axes)
    if dim % size:
      raise ValueError(
          f"{path}: shape {shape} cannot be sharded as {spec} by rule {pattern!r}: "
          f"dimension {dim} is not divisible by mesh axes {axes} (size {size})")
  # Axes of size 1 are dropped: the same spec then reads well in logs and checkpoints.
  return P(*(None if _axis_size(mesh, a) == 1 else a for a in spec))


def tree_shardings(mesh: Mesh, tree: Any, rules: Rules | str | None = None) -> Any:
  """`NamedSharding` per leaf of a params pytree (arrays or ShapeDtypeStructs)."""
  rules = resolve_rules(rules)
  return utils.map_with_names(
      lambda p, x: NamedSharding(mesh, partition_spec(mesh, p, np.shape(x), rules)), tree)


def state_shardings(mesh: Mesh, state: Any, params: Any, rules: Rules | str | None = None) -> Any:
  """Shardings for a whole train state (any pytree holding ``params``).

  Leaves whose path ends with a param's path and that have its shape (the params
  themselves, optimizer moments) get the param's sharding; all others are replicated.
  """
  rules = resolve_rules(rules)
  by_path = {}
  for p, x in utils.flatten_with_names(params):
    by_path[p] = (tuple(np.shape(x)), partition_spec(mesh, p, np.shape(x), rules))
  tails = {tuple(k.split("/")) for k in by_path}
  longest = max((len(t) for t in tails), default=0)

  def one(path, x):
    parts = path.split("/")
    for n in range(min(len(parts), longest), 0, -1):
      hit = by_path.get("/".join(parts[-n:]))
      if hit is not None and hit[0] == tuple(np.shape(x)):
        return NamedSharding(mesh, hit[1])
    return replicated(mesh)

  return utils.map_with_names(one, state)


def describe_shardings(params: Any, shardings: Any, limit: int = 12) -> str:
  """A few lines 'path shape -> spec' for logs (sharded leaves first)."""
  rows = []
  for (p, x), s in zip(utils.flatten_with_names(params), jax.tree.leaves(shardings)):
    spec = getattr(s, "spec", P())
    if any(a is not None for a in spec):
      rows.append(f"  {p} {tuple(np.shape(x))} -> {spec}")
  more = f"\n  (+{len(rows) - limit} more sharded leaves)" if len(rows) > limit else ""
  return "\n".join(rows[:limit]) + more if rows else "  (all replicated)"


# ------------------------------------------------------------------- placing arrays
def put(tree: Any, shardings: Any) -> Any:
  """Places every leaf on its sharding without gathering anything onto one device.

  Host arrays (NumPy, or single-device jax arrays: the same full value on every
  process) are sliced per device with `jax.make_array_from_callback`; global jax
  arrays with another sharding are resharded by one jitted identity (collectives
  only, also across processes). Leaves already placed right are returned as they are.
  """
  leaves, treedef = jax.tree.flatten(tree)
  shards = treedef.flatten_up_to(shardings)
  out = list(leaves)
  moves = []
  for i, (x, s) in enumerate(zip(leaves, shards)):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      if x.sharding.is_equivalent_to(s, x.ndim):
        continue
      if len(x.sharding.device_set) > 1 or not x.is_fully_addressable:
        moves.append(i)
        continue
    host = np.asarray(x)
    out[i] = jax.make_array_from_callback(host.shape, s, lambda idx, h=host: h[idx])
  if moves:
    moved = _reshard(tuple(leaves[i] for i in moves), tuple(shards[i] for i in moves))
    for i, y in zip(moves, moved):
      out[i] = y
  return treedef.unflatten(out)


def _reshard(xs, shardings):
  return jax.jit(lambda *a: a, out_shardings=shardings)(*xs)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over ``data`` and ``fsdp``; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
  return _axis_size(mesh, BATCH_AXES)


def process_batch_slot(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """``(slot, slots)``: which contiguous slice of every global batch this process feeds.

  The process's devices hold rows ``[slot * n, (slot + 1) * n)`` of a batch sharded by
  `batch_sharding`, with ``n = global_batch // slots``; processes that share rows (a
  ``model`` axis spanning hosts) get the same slot. Pass them to ``data.get`` as
  ``process_index`` / ``process_count``.

  Raises:
    ValueError: ``global_batch`` is not divisible by the data-parallel devices, or the
      mesh gives this process non-contiguous rows.
  """
  dp = data_parallel_size(mesh)
  if global_batch % dp:
    raise ValueError(f"batch size {global_batch} is not divisible by the {dp} data-parallel "
                     f"devices of mesh {describe(mesh)}")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({(idx[0].start or 0, idx[0].stop or global_batch) for idx in index_map.values()})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start:
    raise ValueError(f"mesh {describe(mesh)} gives process {jax.process_index()} "
                     f"non-contiguous batch rows {rows}")
  size = stop - start
  return start // size, global_batch // size


def shard_batch(mesh: Mesh, batch: Mapping[str, np.ndarray], global_batch: int | None = None) -> dict:
  """This process's slice of a global batch -> global arrays split over the batch axes."""
  out = {}
  for k, x in batch.items():
    x = np.asarray(x)
    shape = None if global_batch is None else (global_batch, *x.shape[1:])
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x, shape)
  return out


def jit_init(fn: Callable[..., Any], mesh: Mesh, params_of: Callable[[Any], Any],
             rules: Rules | str | None = None, *args) -> Any:
  """Runs ``fn(*args)`` jitted with its outputs born sharded (big_vision's init).

  ``jax.eval_shape`` gives the output's structure, `state_shardings` (with the params
  that ``params_of(output)`` picks) its shardings, and the jitted call writes each
  device's shard directly: the full state never exists on one device.
  """
  abstract = jax.eval_shape(fn, *args)
  shardings = state_shardings(mesh, abstract, params_of(abstract), rules)
  return jax.jit(fn, out_shardings=shardings)(*args), shardings

"""Checkpoints: orbax CheckpointManager with a clear error instead of a silent fresh start.

Every run of the experiment (teacher, each student, each InherNet) keeps its own
`orbax.checkpoint.CheckpointManager` directory. A checkpoint holds two items: ``state``
(any pytree: the train state, saved with ``StandardSave``) and ``meta`` (JSON: the
run's history so far and its partial-epoch accumulators), so a run killed at any moment
resumes with the same parameters, optimizer state, data position and metrics.

Orbax writes each step into a temporary directory and renames it when complete, so a
SIGKILL mid-save leaves no half checkpoint behind; the unfinished temporary directory is
ignored (and cleaned up) on restart.

Example::

  mngr = checkpoint.manager(workdir / "checkpoints", max_to_keep=2)
  restored = checkpoint.restore_latest(mngr, abstract_state)   # None when empty
  ...
  checkpoint.save(mngr, step, state, {"history": history})
  mngr.wait_until_finished()
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


class CheckpointError(RuntimeError):
  """A checkpoint directory that exists but cannot be restored into this run."""


def manager(
    directory: str | os.PathLike,
    *,
    max_to_keep: int | None = 2,
    async_save: bool = True,
) -> ocp.CheckpointManager:
  """A CheckpointManager for one run (items ``state`` and ``meta``).

  Args:
    directory: the run's checkpoint directory (created if missing).
    max_to_keep: how many checkpoints to keep (None: all).
    async_save: write in a background thread (call ``wait_until_finished`` before
      reading the files or exiting).
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
  )
  return ocp.CheckpointManager(
      os.fspath(os.path.abspath(directory)),
      options=options,
      # Explicit handlers: a fresh process can read metadata before restoring.
      item_handlers={
          "state": ocp.StandardCheckpointHandler(),
          "meta": ocp.JsonCheckpointHandler(),
      },
  )


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  """Saves ``state`` (pytree) and ``meta`` (JSON-serialisable) at ``step``, always."""
  # A frozen copy: an async save serialises ``meta`` in a background thread, while the
  # caller goes on mutating its history and running sums.
  meta = json.loads(json.dumps(meta))
  mngr.save(
      int(step),
      args=ocp.args.Composite(
          # A plain nested dict (flax's state dict): any pytree of the run's, flax
          # structs and optax namedtuples included, with readable '/'-joined paths.
          state=ocp.args.StandardSave(serialization.to_state_dict(state)),
          meta=ocp.args.JsonSave(meta),
      ),
      force=True,
  )


def describe(tree) -> dict[str, tuple]:
  """'/'-joined path -> shape of every leaf (arrays or ShapeDtypeStructs), for `diff`."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    out[name] = tuple(getattr(leaf, "shape", np.shape(leaf)))
  return out


def diff(
    got: dict,
    wanted: dict,
    limit: int = 8,
    *,
    got_name: str = "checkpoint",
    wanted_name: str = "run",
    notes: dict[str, str] | None = None,
) -> str:
  """A readable diff of two `describe` results (empty when they agree).

  Args:
    got: path -> shape of what was read (a checkpoint, converted weights).
    wanted: path -> shape of what the model expects.
    limit: keys shown per kind of difference (then a count).
    got_name, wanted_name: how the two sides are called in the text.
    notes: path -> text shown after the path (e.g. the PyTorch name it came from).
  """
  notes = notes or {}
  name = lambda k: f"{k} ({notes[k]})" if k in notes else k
  missing = sorted(set(wanted) - set(got))
  unexpected = sorted(set(got) - set(wanted))
  mismatched = sorted(k for k in set(got) & set(wanted) if got[k] != wanted[k])
  lines = []
  for title, keys, fmt in (
      (f"missing in {got_name}", missing, lambda k: f"{name(k)} {wanted[k]}"),
      (f"unexpected in {got_name}", unexpected, lambda k: f"{name(k)} {got[k]}"),
      ("shape mismatch", mismatched,
       lambda k: f"{name(k)}: {got_name} {got[k]} vs {wanted_name} {wanted[k]}"),
  ):
    if keys:
      shown = ", ".join(fmt(k) for k in keys[:limit])
      more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
      lines.append(f"  {title}: {shown}{more}")
  return "\n".join(lines)


_describe, _diff = describe, diff  # The earlier private names.


def _sharding(x):
  return x.sharding if isinstance(x, jax.Array) else getattr(x, "sharding", None)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any, dict] | None:
  """The latest checkpoint as ``(step, state, meta)``, or None when there is none.

  Args:
    mngr: from `manager`.
    abstract_state: the run's state pytree (arrays or `jax.ShapeDtypeStruct`s); the
      checkpoint must have exactly its structure and shapes. Leaves are restored with
      their shardings (a checkpoint written on another mesh shape, or by another number
      of processes, restores onto this one).

  Raises:
    CheckpointError: the directory holds a checkpoint that is unreadable (corrupt,
      truncated) or was written by a different run (other model, spec or optimizer);
      the message names the directory and the differences. Never a silent fresh start:
      delete the directory (or use another workdir) to start over.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  where = os.path.join(str(mngr.directory), str(step))
  try:
    metadata = mngr.item_metadata(step)["state"]
  except Exception as e:  # Orbax raises many types for a damaged directory.
    raise CheckpointError(
        f"checkpoint {where} is unreadable ({type(e).__name__}: {e}); delete "
        f"{mngr.directory} to start this run over"
    ) from e
  if metadata is None:
    raise CheckpointError(f"checkpoint {where} has no 'state' item; delete {mngr.directory} to start over")
  saved = describe(getattr(metadata, "tree", metadata))
  template = serialization.to_state_dict(abstract_state)
  wanted = describe(template)
  differences = diff(saved, wanted)
  if differences:
    raise CheckpointError(
        f"checkpoint {where} does not match this run (was it written with another model, "
        f"spec or optimizer?):\n{differences}\nUse another workdir, or delete {mngr.directory} "
        "to start this run over"
    )
  # Restored straight into the run's shardings (whatever mesh wrote the checkpoint):
  # each process reads only the shards its devices hold.
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=_sharding(x))
      if hasattr(x, "dtype") else x,
      template,
  )
  try:
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        ),
    )
  except Exception as e:
    raise CheckpointError(
        f"checkpoint {where} could not be restored ({type(e).__name__}: {e}); delete "
        f"{mngr.directory} to start this run over"
    ) from e
  state = serialization.from_state_dict(abstract_state, restored["state"])
  return step, state, dict(restored["meta"] or {})


def load_variables(directory: str | os.PathLike, abstract_variables: dict) -> dict:
  """``{"params"[, "batch_stats"]}`` of the latest checkpoint of a finished run.

  For a teacher trained by an earlier experiment (``.../seed_0/teacher``), or any
  checkpoint whose ``state`` item has ``params`` (and ``batch_stats``) entries.

  Args:
    directory: a run directory (with ``checkpoints/``) or a CheckpointManager directory.
    abstract_variables: the model's variables (arrays or ShapeDtypeStructs) the
      checkpoint must match.

  Raises:
    CheckpointError: no checkpoint there, or one that does not match (a readable diff).
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory}")
  # Only params and batch_stats are read (a partial restore: no optimizer state), each
  # straight into the sharding of its abstract leaf (replicated on every device when the
  # leaf has none), so a checkpoint from any mesh or number of processes loads here.
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}")
  where = os.path.join(directory, str(step))
  wanted = {k: v for k, v in abstract_variables.items() if k in ("params", "batch_stats") and v}
  try:
    metadata = mngr.item_metadata(step)["state"]
  except Exception as e:
    raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {e})") from e
  saved = getattr(metadata, "tree", metadata) or {}
  got = {k: saved.get(k) for k in wanted}
  got = {k: v for k, v in got.items() if v}
  differences = diff(describe(got), describe(wanted))
  if differences:
    raise CheckpointError(f"checkpoint {where} does not match the model:\n{differences}")
  everywhere = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.devices()), ("all",)), jax.sharding.PartitionSpec())
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=_sharding(x) or everywhere),
      wanted)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"]
  except Exception as e:
    raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {e})") from e
  mngr.close()
  return {k: restored[k] for k in wanted}


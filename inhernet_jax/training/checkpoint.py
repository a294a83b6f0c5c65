"""Checkpoints: orbax CheckpointManager with a clear error instead of a silent fresh start.

Every run of the experiment (teacher, each student, each InherNet) keeps its own
`orbax.checkpoint.CheckpointManager` directory. A checkpoint holds two items: ``state``
(any pytree: the train state, saved with ``StandardSave``) and ``meta`` (JSON: the
run's history so far and its partial-epoch accumulators), so a run killed at any moment
resumes with the same parameters, optimizer state, data position and metrics.

Orbax writes each step into a temporary directory and renames it when complete, so a
SIGKILL mid-save leaves no half checkpoint behind; the unfinished temporary directory is
ignored (and cleaned up) on restart.

Nothing restored is trusted blindly (`inhernet_jax.training.integrity`): each save records a
checksum of the state in ``meta`` and a digest of ``meta`` itself, and `restore_latest`
verifies both (`verified_meta`: a meta without them, or with a checksum of another
algorithm, counts as damaged), falling back to the previous step (and moving the damaged
one aside to ``<directory>.corrupt/``) when a checkpoint is damaged; `load_variables`
also refuses NaN/Inf weights, naming each leaf (`check_finite`); and a ``fingerprint`` of the run (its optimizer, epochs, model,
teacher, data...) saved in ``meta`` must match the resuming run's, or the differing
fields are listed.

Example:
  ```python
  mngr = checkpoint.manager(workdir / "checkpoints", max_to_keep=2)
  restored = checkpoint.restore_latest(mngr, abstract_state)   # None when empty
  ...
  checkpoint.save(mngr, step, state, {"history": history})
  mngr.wait_until_finished()
  ```
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import serialization

from inhernet_jax.training import integrity
from inhernet_jax.training import teardown
from inhernet_jax.common import utils

teardown.install()  # A failed restore ends with its error only (no late tracebacks).


class CheckpointError(RuntimeError):
  """A checkpoint directory that exists but cannot be restored into this run."""


class _Damaged(CheckpointError):
  """One step that cannot be read or whose checksum is wrong (an earlier one may do)."""


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
  if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                  or max_to_keep < 1):
    raise ValueError(f"keep_checkpoints (max_to_keep) must be an int >= 1 or None (keep all), "
                     f"got {max_to_keep!r}: 0 would delete every checkpoint")
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
  """Saves ``state`` (pytree) and ``meta`` (JSON-serialisable) at ``step``, always.

  ``meta`` gets ``checksum`` (of the state, verified by `restore_latest`) and
  ``meta_digest`` (of the rest of ``meta``).
  """
  # A frozen copy: an async save serialises ``meta`` in a background thread, while the
  # caller goes on mutating its history and running sums.
  meta = json.loads(json.dumps(meta))
  # A plain nested dict (flax's state dict): any pytree of the run's, flax structs and
  # optax namedtuples included, with readable '/'-joined paths.
  tree = serialization.to_state_dict(state)
  meta["checksum"] = {"algorithm": integrity.ALGORITHM, "leaves": integrity.checksum(tree)}
  meta["saved_step"] = int(step)  # A step directory renamed to another step is refused.
  meta.pop("meta_digest", None)
  meta["meta_digest"] = integrity.digest(meta)
  with teardown.ctrl_c_deferred():  # A Ctrl-C lands after the save, not inside orbax's.
    mngr.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def check_finite(variables, where: str) -> None:
  """Every floating leaf of ``variables`` finite, or one `CheckpointError` naming each
  leaf that holds NaN/Inf (with its count) and ``where`` they came from."""
  bad = integrity.nonfinite(variables)
  if bad:
    shown = ", ".join(f"{p} ({n} NaN/Inf)" for p, n in sorted(bad.items())[:8])
    more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
    raise CheckpointError(f"{where} holds non-finite values in {len(bad)} leaves: {shown}{more}; "
                          "a network with NaN/Inf weights cannot be used (did its training "
                          "diverge?)")


def verified_meta(meta: dict | None, where: str, error: type[Exception] = CheckpointError,
                  step: int | None = None) -> dict:
  """``meta`` without its ``meta_digest``, after checking it against that digest, that
  its ``checksum`` is of this version's algorithm (`integrity.ALGORITHM`) and that it was
  saved as ``step`` (when given, and recorded: checkpoints before the step was recorded
  have none).

  No key's removal disables the check: a meta without ``meta_digest`` or ``checksum`` is
  refused like a wrong one, and the algorithm is this package's, never the file's. The
  digest is an unkeyed sha256: it catches damage and edits that do not recompute it; it
  is not a signature (whoever can rewrite the files can recompute it, as they could
  rewrite the state itself), so a workdir is trusted like the code that reads it.

  Raises:
    ``error``: the reason, naming ``where``.
  """
  if meta is not None and not isinstance(meta, dict):
    raise error(f"checkpoint {where}: its meta is a JSON {type(meta).__name__}, not an "
                "object (damaged or not written by this package)")
  meta = dict(meta or {})
  digest = meta.pop("meta_digest", None)
  if digest is None:
    raise error(f"checkpoint {where}: its meta has no meta_digest, so its history and "
                "checksums cannot be verified (edited, or written by an older version)")
  if digest != integrity.digest(meta):
    raise error(f"checkpoint {where}: its meta (history, checksums) fails its digest")
  sums = meta.get("checksum")
  if not isinstance(sums, dict) or not isinstance(sums.get("leaves"), dict):
    raise error(f"checkpoint {where}: its meta records no checksum of the state")
  if sums.get("algorithm") != integrity.ALGORITHM:
    raise error(f"checkpoint {where}: its checksum is of algorithm {sums.get('algorithm')!r}; "
                f"this version verifies {integrity.ALGORITHM!r} only")
  if step is not None and "saved_step" in meta and meta["saved_step"] != step:
    raise error(f"checkpoint {where}: its meta was saved as step {meta['saved_step']!r}, not "
                f"{step} (a step directory renamed?)")
  return meta


def describe(tree) -> dict[str, tuple]:
  """'/'-joined path -> shape of every leaf (arrays or ShapeDtypeStructs), for `diff`."""
  return {name: tuple(getattr(leaf, "shape", np.shape(leaf)))
          for name, leaf in utils.flatten_with_names(tree)}


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
    got_name: how the first side (``got``) is called in the text.
    wanted_name: how the second side (``wanted``) is called in the text.
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


def restore_latest(
    mngr: ocp.CheckpointManager,
    abstract_state: Any,
    *,
    fingerprint: dict | None = None,
    allow_changes: tuple[str, ...] = (),
    required_meta: tuple[str, ...] = (),
) -> tuple[int, Any, dict] | None:
  """The latest good checkpoint as ``(step, state, meta)``, or None when there is none.

  Args:
    mngr: from `manager`.
    abstract_state: the run's state pytree (arrays or `jax.ShapeDtypeStruct`s); the
      checkpoint must have exactly its structure and shapes. Leaves are restored with
      their shardings (a checkpoint written on another mesh shape, or by another number
      of processes, restores onto this one).
    fingerprint: this run's `integrity.fingerprint`; the checkpoint's ``meta`` must hold
      the same (None: not checked).
    allow_changes: fingerprint fields allowed to differ (`integrity.fingerprint_diff`),
      e.g. ``("epochs",)`` to extend a finished run; ``("*",)`` accepts any.
    required_meta: ``meta`` keys the run needs (``"history"``...).

  A step that cannot be read or fails its checksum is skipped for the one before it,
  with a warning; when an earlier step is good, the damaged ones are moved to
  ``<directory>.corrupt/`` (kept for inspection, out of the way of new saves).

  Raises:
    CheckpointError: the directory holds a checkpoint written by a different run (other
      model, spec or optimizer shapes; or another fingerprint: the differing fields are
      listed), or only damaged ones; the message names the directory and says how to
      start over. Never a silent fresh start.
  """
  teardown.install()  # Again: a hook installed since the import (a test's) is wrapped too.
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  template = serialization.to_state_dict(abstract_state)
  damaged = []
  for step in steps:
    try:
      step, state, meta = _restore_step(mngr, step, abstract_state, template, fingerprint,
                                        tuple(allow_changes), tuple(required_meta))
    except _Damaged as e:
      logging.warning("%s; trying the checkpoint before it", e)
      damaged.append((step, str(e)))
      continue
    for bad, _ in damaged:
      _set_aside(mngr, bad)
    if damaged:
      logging.warning("resumed from step %d of %s instead of damaged step(s) %s (moved to %s)",
                      step, mngr.directory, [b for b, _ in damaged], _corrupt_dir(mngr))
      mngr.reload()
    return step, state, meta
  raise CheckpointError(
      f"every checkpoint in {mngr.directory} is damaged:\n" +
      "\n".join(f"  {why}" for _, why in damaged) +
      f"\nDelete {mngr.directory} (or use another workdir) to start this run over")


def _corrupt_dir(mngr) -> str:
  return os.fspath(mngr.directory).rstrip("/") + ".corrupt"


def _set_aside(mngr, step: int) -> None:
  """Moves a damaged step out of the manager's directory (nothing is deleted)."""
  if jax.process_index() != 0:
    return
  src = os.path.join(os.fspath(mngr.directory), str(step))
  dst = os.path.join(_corrupt_dir(mngr), str(step))
  os.makedirs(_corrupt_dir(mngr), exist_ok=True)
  suffix = 0
  while os.path.exists(dst):
    suffix += 1
    dst = os.path.join(_corrupt_dir(mngr), f"{step}.{suffix}")
  shutil.move(src, dst)


def _restore_step(mngr, step, abstract_state, template, fingerprint, allow, required):
  where = os.path.join(str(mngr.directory), str(step))
  start_over = f"delete {mngr.directory} (or use another workdir) to start this run over"
  fresh = f"delete {mngr.directory} (or use another workdir)"
  try:
    metadata = mngr.item_metadata(step)["state"]
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # Orbax raises many types for a damaged directory.
    raise _Damaged(f"checkpoint {where} is unreadable ({type(e).__name__}: {e})") from e
  if metadata is None:
    raise _Damaged(f"checkpoint {where} has no 'state' item")
  meta = verified_meta(meta, where, _Damaged, step=step)
  missing = [k for k in required if k not in meta]
  if missing:
    raise CheckpointError(
        f"checkpoint {where} has no {', '.join(map(repr, missing))} in its meta: it was not "
        f"written by this trainer (keys: {sorted(meta)}); {start_over}")
  saved = describe(getattr(metadata, "tree", metadata))
  differences = diff(saved, describe(template))
  if differences:
    raise CheckpointError(
        f"checkpoint {where} does not match this run (was it written with another model, "
        f"spec or optimizer?):\n{differences}\nUse another workdir, or {start_over}")
  if fingerprint is not None:
    if "fingerprint" not in meta and "*" not in allow:
      raise CheckpointError(
          f"checkpoint {where} records no run fingerprint (written before fingerprints "
          f"existed), so it cannot be checked against this run; {start_over}, or accept it "
          "as it is with allow_resume_changes='*'")
    lines = integrity.fingerprint_diff(meta.get("fingerprint", {}), fingerprint, allow)
    if lines:
      fields = sorted({l.split(":")[0].strip() for l in lines})
      raise CheckpointError(
          f"checkpoint {where} was written by a different run; these settings differ:\n"
          + "\n".join(lines) + f"\nTo start this run over, {fresh}. To continue it "
          f"deliberately with the new settings, allow them: allow_resume_changes="
          f"'{','.join(fields)}' (--config.allow_resume_changes=... on the command line; "
          "'epochs' alone extends a finished run)")
  # Restored straight into the run's shardings (whatever mesh wrote the checkpoint):
  # each process reads only the shards its devices hold.
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=_sharding(x))
      if hasattr(x, "dtype") else x,
      template,
  )
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  except Exception as e:
    raise _Damaged(f"checkpoint {where} could not be restored ({type(e).__name__}: {e})") from e
  # Always this version's algorithm (verified_meta): never one named by the file.
  bad = integrity.mismatched(meta["checksum"]["leaves"], integrity.checksum(restored["state"]))
  if bad:
    shown = ", ".join(bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
    raise _Damaged(f"checkpoint {where} fails its checksum (damaged on disk?): {shown}")
  state = serialization.from_state_dict(abstract_state, restored["state"])
  return step, state, meta


def run_status(directory: str | os.PathLike) -> dict:
  """``{"step", "total_steps", "finished", "directory"}`` of a run's latest checkpoint.

  ``total_steps`` and ``finished`` are None for checkpoints that do not record the
  run's length (written by `launch.inherit`, or by an older version).

  Raises:
    CheckpointError: no checkpoint there, or one whose meta cannot be read.
  """
  directory = _checkpoint_dir(directory)
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  step = mngr.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}")
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}
  except Exception as e:
    raise CheckpointError(f"checkpoint {directory}/{step}: its meta is unreadable "
                          f"({type(e).__name__}: {e})") from e
  finally:
    mngr.close()
  meta = verified_meta(meta, f"{directory}/{step}", step=step)  # total_steps: "finished".
  total = meta.get("total_steps")
  return {"step": step, "total_steps": total, "directory": directory,
          "finished": None if total is None else step >= total}


def _checkpoint_dir(directory) -> str:
  directory = os.path.abspath(os.fspath(directory))
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory at {directory}")
  return directory


def load_variables(directory: str | os.PathLike, abstract_variables: dict) -> dict:
  """``{"params"[, "batch_stats"]}`` of the latest checkpoint of a finished run.

  For a teacher trained by an earlier experiment (``.../seed_0/teacher``), or any
  checkpoint whose ``state`` item has ``params`` (and ``batch_stats``) entries.

  Args:
    directory: a run directory (with ``checkpoints/``) or a CheckpointManager directory.
    abstract_variables: the model's variables (arrays or ShapeDtypeStructs) the
      checkpoint must match.

  Raises:
    CheckpointError: no checkpoint there, one that does not match (a readable diff),
      whose meta or checksum fails (`verified_meta`), or that holds NaN/Inf (every such
      leaf named, `check_finite`).
  """
  directory = _checkpoint_dir(directory)
  teardown.install()
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
  out = {k: restored[k] for k in wanted}
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - an unreadable meta cannot vouch for the state.
    raise CheckpointError(f"checkpoint {where}: its meta is unreadable "
                          f"({type(e).__name__}: {e})") from e
  finally:
    mngr.close()
  meta = verified_meta(meta, where, step=step)
  saved_sums = {k: v for k, v in meta["checksum"]["leaves"].items() if k.split("/")[0] in out}
  bad = integrity.mismatched(saved_sums, integrity.checksum(out))
  if bad:
    raise CheckpointError(f"checkpoint {where} fails its checksum (damaged on disk?): "
                          f"{', '.join(bad[:5])}")
  check_finite(out, f"checkpoint {where}")
  return out


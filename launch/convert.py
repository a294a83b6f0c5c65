r"""PyTorch weights -> Flax teacher -> inherited network, in one command.

  python -m launch.convert --torchvision=resnet50 --weights=resnet50.pth \
      --rank=0.25 --heads=3 --out=/tmp/resnet50_r025
  python -m launch.convert --hf=vit --weights=vit-base-patch16-224/ --energy=0.9 --out=...
  python -m launch.convert --hf=bert --weights=model.safetensors --hf_config=config.json \
      --init_head --rank=64 --out=...
  python -m launch.convert --torchvision=resnet50 --weights=resnet50.pth \
      --budget=student:resnet18 --out=...     # per-layer ranks at ResNet-18's size
  python -m launch.convert --torchvision=resnet18 --weights=resnet18.pth --out=...  # only converts
  python -m launch.convert --torchvision=resnet50 --weights=resnet50.pth --rank=0.25 \
      --config=configs/imagenet.py --recalibration_batches=64 --out=...  # BN re-estimated

Installed (``pip install``), the same command is ``inhernet-convert``, with the same flags.

Writes ``OUT/model.safetensors`` + ``OUT/spec.json`` (`inhernet_jax.interop.export`: the inherited
variables and their spec, or the converted teacher with a null spec when neither
``--rank``, ``--energy`` nor ``--budget`` is given; `launch.spec_flags`) and, when inheriting, ``OUT/report.md`` with the
per-layer report it also prints. Nothing is downloaded: a missing weights file is an
error that says how to get it. With ``--config`` (its data config: ImageNet for the
torchvision ResNets) the inherited network's BatchNorm statistics are re-estimated on
its training batches, the path every inherited network takes (`launch.recalibrate_flags`).
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from inhernet_jax.decomposition import accounting
from inhernet_jax.interop import convert
from inhernet_jax.interop import export
from inhernet_jax.decomposition.transform import inherit
from inhernet_jax.models import imagenet
from inhernet_jax.experiment import preflight
from . import cli, recalibrate_flags, spec_flags

_TORCHVISION = flags.DEFINE_enum("torchvision", None, list(imagenet.MODELS),
                                 "A torchvision ResNet's weights (--weights: .pth or .safetensors).")
_HF = flags.DEFINE_enum("hf", None, list(convert.HF_KINDS),
                        "A Hugging Face ViT or BERT (--weights: model directory or weights file).")
_WEIGHTS = flags.DEFINE_string("weights", None, "The PyTorch weights (file or HF model directory).")
_HF_CONFIG = flags.DEFINE_string("hf_config", None, "HF config.json (default: next to --weights).")
_INIT_HEAD = flags.DEFINE_bool("init_head", False, "HF checkpoints without a classifier: zero head.")
_IGNORE = flags.DEFINE_multi_string(
    "ignore", None, "Regex of PyTorch names to drop (repeatable; default: convert.DEFAULT_IGNORE).")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not hold an export yet).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "An experiment config whose data give the BatchNorm re-estimation's "
    "calibration batches (`launch.recalibrate_flags`; e.g. configs/imagenet.py).")
flags.mark_flags_as_required(["weights", "out"])
flags.adopt_module_key_flags(spec_flags)  # --help lists them with this command's own.
flags.adopt_module_key_flags(recalibrate_flags)

# Zoo names whose presets fit the converted models.
_PRESET_NAME = {"vit": "vit_b16", "bert": "bert_base"}


def load(source: str, kind: str, weights: str, hf_config: str | None = None, *,
         ignore=None, init_head: bool = False):
  """``(model, variables, zoo name, metadata)`` of a torchvision or HF checkpoint."""
  try:
    if source == "torchvision":
      model, variables = convert.from_torchvision(weights, kind, ignore=ignore)
      meta = {"source": "torchvision", "model": kind, "num_classes": model.num_classes,
              "num_filters": model.num_filters}
      return model, variables, kind, meta
    config = convert.read_hf_config(hf_config) if hf_config else None
    model, variables = convert.from_hf(weights, kind, config=config, ignore=ignore,
                                       init_head=init_head)
    config = config or convert.read_hf_config(_hf_dir(weights))
    return model, variables, _PRESET_NAME[kind], {"source": "hf", "model": kind, "hf_config": config}
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  except (convert.ConversionError, ImportError, OSError) as e:  # Named, one line each.
    text = str(e)  # Most name the file already: "--weights=FILE: why", not the path twice.
    raise app.UsageError(f"--weights={text}" if text.startswith(f"{weights}:")
                         else f"--weights={weights}: {text}") from None


def _hf_dir(weights: str) -> str:
  return weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))


def check() -> None:
  """Every flag, before any weights are read or anything is written.

  Raises:
    app.UsageError, validate.ConfigError: naming the flag and what was expected.
  """
  if (_TORCHVISION.value is None) == (_HF.value is None):
    raise app.UsageError("give exactly one of --torchvision and --hf")
  spec_flags.check(required=False)
  config = cli.load_config(_CONFIG) if flags.FLAGS["config"].present else None
  recalibrate_flags.check(config)
  out = os.path.abspath(_OUT.value)
  if any(os.path.exists(os.path.join(out, f)) for f in (export.WEIGHTS, export.SPEC)):
    raise app.UsageError(f"--out={out} already holds an export; choose another directory")
  preflight.check_workdir(out, "--out", create=False)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.quiet():  # Its one-line error first, if any.
    check()
  out = os.path.abspath(_OUT.value)
  source, kind = ("torchvision", _TORCHVISION.value) if _TORCHVISION.value else ("hf", _HF.value)
  with cli.errors():  # An untrusted file's every failure: one `error:` line, no traceback.
    model, variables, name, meta = load(source, kind, _WEIGHTS.value, _HF_CONFIG.value,
                                        ignore=_IGNORE.value, init_head=_INIT_HEAD.value)
  teacher_count = accounting.param_count(variables["params"])
  meta["weights"] = os.path.abspath(_WEIGHTS.value)
  if not spec_flags.given():
    export.save(out, variables, None, metadata=meta)
    print(f"converted {source} {kind}: {teacher_count:,} parameters; written to {out}")
    return
  num_classes = meta.get("num_classes") or meta.get("hf_config", {}).get("num_labels")
  spec = spec_flags.make_spec(variables["params"], name, num_classes)
  params, rows = inherit(variables["params"], spec, return_report=True)
  inherited = {**variables, "params": params}
  # The inherited variables, checked against the inherited model's own tree.
  student = model.clone(spec=spec)
  example = (convert.hf_example_input(meta["hf_config"], kind) if source == "hf"
             else jax.ShapeDtypeStruct((1, 224, 224, 3), "float32"))
  inherited = convert.match_variables(inherited, convert.abstract_variables(student, example))
  inherited, recalibrated = recalibrate_flags.maybe_recalibrate(student, inherited, _CONFIG.value)
  if recalibrated:
    meta["batch_stats"] = recalibrated
  export.save(out, inherited, spec, metadata=meta)
  print(export.save_report(out, rows, f"{source} {kind} inherited", (f"weights: {meta['weights']}",)))
  if recalibrated:
    print(recalibrated)
  after = accounting.param_count(params)
  print(f"whole network: teacher {teacher_count:,} parameters -> inherited {after:,} "
        f"({after / teacher_count:.1%}); written to {out}")


if __name__ == "__main__":
  cli.run(main, interrupted="nothing was exported unless it printed 'written to'; run the "
          "same command again")

r"""Benchmarks of the sharded train step: SPMD overhead on CPU, step time and MFU on an accelerator.

The step measured is the one the trainer runs on a mesh (`inhernet_jax.parallel.sharding`):

```python
state, state_sh = sharding.jit_init(create, mesh, params_of, rules, key)   # born sharded
step = jax.jit(train.make_train_step(...), in_shardings=(state_sh, batch_sh, None),
               out_shardings=(state_sh, replicated), donate_argnums=0)
state, metrics = step(state, sharding.shard_batch(mesh, batch), None)
```

(`benchmarks.scale_step.build_sharded_step`). Batches are synthetic (random NumPy, the same batch every
step, placed once): the input pipeline is not measured, and nothing here imports grain,
tensorflow_datasets, ml_collections or orbax (the trainer imports its checkpointer only
when a run starts).

Parts:

1. ``cpu``: the same global batch and model (a CIFAR ResNet and a small ViT, the ViT also
   inherited) timed in a child process with 1 CPU device and in one with N simulated CPU
   devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), meshes ``data=N``,
   ``data=N/2,fsdp=2`` and, for the ViTs, ``data=N/4,model=4`` with the
   ``tensor_parallel`` rules. Simulated devices share the machine's cores, so the ratio to
   one device measures the partitioning and collective overhead, not a speed-up. Each
   configuration also records the loss of its first step (initial params, same batch),
   which must equal the 1-device loss (``--loss_tol``): the sharded program computes the
   same function.
2. ``accelerator`` (default when ``jax.default_backend() != "cpu"``, or ``--parts``):
   ResNet-18 for CIFAR (32x32, 100 classes) and ViT-S/16 (224x224, 1000 classes), teacher
   and inherited (``--rank`` fraction of each layer's full rank, ``--heads``), float32 and
   bfloat16, on the 1-device mesh: compile time, median step time, examples/s, model
   FLOPs per step from XLA's cost analysis of the compiled train step (and a
   3 x forward-FLOPs estimate, `accounting.forward_flops`), achieved TFLOP/s and MFU.

MFU peaks (dense, per chip, TFLOP/s): float32 steps are compared with the **TF32**
tensor-core peak (JAX's default matmul precision lets XLA use TF32 for float32 dots and
convolutions on Ampere and later), also reported against the float32 CUDA-core peak;
bfloat16 steps with the bf16 peak. H100 SXM and H200: 989.4 bf16, 494.7 TF32, 66.9 FP32;
H100 PCIe: 756, 378, 51.2; A100: 312, 156, 19.5. ``--peak_tflops`` overrides the peak for
every dtype. On CPU no MFU is reported.

The CNNs have a ``dtype`` field (their convs' computation dtype, float32 by default) that
``compute_dtype`` does not change: with ``compute_dtype=bfloat16`` and a float32 model
the convs still run in float32. bfloat16 CNN rows therefore set the model's ``dtype`` to
bfloat16, and ``--cnn_trainer_dtype`` adds a row for the trainer's behaviour (model dtype
float32). Each row records the element types of the step's convolutions and dots
(``matmul_dtypes``, from the lowered StableHLO).

Example:
  ```bash
  # CPU overhead figure (minutes on a small machine, mostly compilation):
  python -m benchmarks.scale --out=scale_cpu.json
  # On a GPU (the accelerator part by default), one model per command to stay short:
  python -m benchmarks.scale --accel_models=resnet18_cifar --out=scale_resnet.json
  python -m benchmarks.scale --accel_models=vit_s16 --out=scale_vit.json
  # Both parts on one machine:
  python -m benchmarks.scale --parts=cpu,accelerator --out=scale.json
  ```
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app, flags, logging

from benchmarks.common import build_model, markdown_table
from benchmarks.scale_step import build_sharded_step, is_transformer, measure  # noqa: F401  (re-exported)

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "scale.json", "Where to write the JSON figures.")
flags.DEFINE_list("parts", ["auto"], "cpu, accelerator, or auto (accelerator when the "
                  "default backend is not cpu, else cpu).")
flags.DEFINE_bool("accelerator", False, "Shorthand for --parts=accelerator.")
flags.DEFINE_integer("cpu_devices", 8, "Simulated CPU devices of the sharded child.")
flags.DEFINE_list("cpu_models", ["resnet20:32", "vit_tiny:32", "vit_tiny+inh:32"],
                  "CPU part: model:batch, '+inh' for the inherited network.")
flags.DEFINE_bool("tiny", False, "Tiny CPU models and few steps (smoke test).")
flags.DEFINE_integer("cpu_warmup", 2, "CPU part: warm-up steps (after compilation).")
flags.DEFINE_integer("cpu_steps", 8, "CPU part: timed steps.")
flags.DEFINE_list("accel_models", ["resnet18_cifar", "vit_s16"], "Accelerator part models.")
flags.DEFINE_list("accel_batch", ["resnet18_cifar:256", "vit_s16:128"],
                  "Accelerator part: model:batch (repeat a model for several batch sizes).")
flags.DEFINE_list("accel_dtypes", ["float32", "bfloat16"], "Accelerator part compute dtypes.")
flags.DEFINE_list("accel_variants", ["teacher", "inherited"], "teacher and/or inherited.")
flags.DEFINE_bool("cnn_trainer_dtype", False, "Accelerator part: also time bf16 CNN teachers "
                  "with the model dtype left float32 (bf16 casts promoted back to f32).")
flags.DEFINE_integer("accel_warmup", 5, "Accelerator part: warm-up steps.")
flags.DEFINE_integer("accel_steps", 30, "Accelerator part: timed steps.")
flags.DEFINE_bool("fwd_flops", True, "Also estimate FLOPs as 3 x forward (one extra compile "
                  "per model and variant).")
flags.DEFINE_float("rank", 0.25, "Inherited networks: rank as a fraction of full rank.")
flags.DEFINE_integer("heads", 2, "Inherited networks: heads H.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s for MFU (default: by device kind).")
flags.DEFINE_float("loss_tol", 1e-5, "Largest |loss - 1-device loss| of a sharded step.")
flags.DEFINE_integer("seed", 0, "Init, batch and dropout seed.")
flags.DEFINE_string("child", None, "Internal: JSON list of cases to measure in this process.")

_MARK = "BENCH_SCALE_JSON:"
CPU_NOTE = ("Simulated CPU devices share the machine's {cores} cores: the N-device rows "
            "measure SPMD partitioning and collective overhead, not a speed-up. The ratio "
            "also mixes in core usage: N device programs run concurrently on all cores, "
            "while one device's program of small ops largely runs on one thread, so a "
            "ratio somewhat below 1 is that, not a gain of sharding.")

# Dense peaks per chip, TFLOP/s: (bf16, tf32, fp32 CUDA cores).
_PEAKS = (
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),
    ("H200", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
)


def _case(model: str, batch: int, *, inherited=False, dtype="float32", model_dtype=None,
          mesh=None, rules="default", warmup=2, steps=8, tiny=False, fwd_flops=False) -> dict:
  return {"model": model, "batch": batch, "inherited": inherited, "dtype": dtype,
          "model_dtype": model_dtype, "mesh": mesh or {"data": -1}, "rules": rules,
          "warmup": warmup, "steps": steps, "tiny": tiny, "fwd_flops": fwd_flops,
          "rank": FLAGS.rank, "heads": FLAGS.heads, "seed": FLAGS.seed}


# --------------------------------------------------------------------- CPU part
def _run_child(cases: list[dict], devices: int) -> list[dict]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  if devices > 1:
    # First: XLA stops reading flags at a token without "--" (the tests'
    # "intra_op_parallelism_threads=1"), so an appended flag could be ignored.
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} " +
                        env.get("XLA_FLAGS", "")).strip()
  cmd = [sys.executable, "-m", "benchmarks.scale", f"--child={json.dumps(cases)}"]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"child with {devices} devices failed:\n{res.stderr[-4000:]}")
  line = [ln for ln in res.stdout.splitlines() if ln.startswith(_MARK)][-1]
  return json.loads(line[len(_MARK):])


def _cpu_meshes(n: int, transformer: bool) -> list[tuple[dict, str]]:
  meshes = [({"data": n}, "default")]
  if n % 2 == 0:
    meshes.append(({"data": n // 2, "fsdp": 2}, "default"))
  if transformer and n % 2 == 0:
    tp = 4 if n % 4 == 0 else 2
    meshes.append(({"data": n // tp, "model": tp}, "tensor_parallel"))
  return meshes


def cpu_part() -> dict:
  n = FLAGS.cpu_devices
  warmup, steps = (1, 2) if FLAGS.tiny else (FLAGS.cpu_warmup, FLAGS.cpu_steps)
  one, many = [], []
  for entry in FLAGS.cpu_models:
    name, batch = entry.split(":")
    inherited = name.endswith("+inh")
    name = name.removesuffix("+inh")
    if FLAGS.tiny and name.startswith("resnet"):
      name = "resnet8"
    batch = 8 if FLAGS.tiny else int(batch)
    _, _, _, preset_name = build_model(name, tiny=FLAGS.tiny)
    kw = dict(inherited=inherited, warmup=warmup, steps=steps, tiny=FLAGS.tiny)
    one.append(_case(name, batch, mesh={"data": 1}, **kw))
    for mesh, rules in _cpu_meshes(n, is_transformer(preset_name)):
      many.append(_case(name, batch, mesh=mesh, rules=rules, **kw))
  t0 = time.perf_counter()
  rows = _run_child(one, 1) + _run_child(many, n)
  base = {(r["model"], r["variant"]): r for r in rows if r["devices"] == 1}
  ok = True
  for r in rows:
    b = base[(r["model"], r["variant"])]
    r["time_vs_1_device"] = r["step_s_median"] / b["step_s_median"]
    r["loss_step0_diff_vs_1_device"] = abs(r["loss_step0"] - b["loss_step0"])
    r["loss_final_diff_vs_1_device"] = abs(r["loss_final"] - b["loss_final"])
    r["loss_ok"] = r["loss_step0_diff_vs_1_device"] <= FLAGS.loss_tol
    ok &= r["loss_ok"]
  note = CPU_NOTE.format(cores=os.cpu_count())
  if "multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""):
    note += (" XLA_FLAGS has --xla_cpu_multi_thread_eigen=false: the 1-device step runs on "
             "one core while N devices spread over all of them, so ratios below 1 are that "
             "extra parallelism; run without it for the overhead figure.")
  return {
      "note": note,
      "cpu_cores": os.cpu_count(),
      "simulated_devices": n,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "loss_tol": FLAGS.loss_tol,
      "loss_check_ok": bool(ok),
      "wall_s": time.perf_counter() - t0,
      "rows": rows,
  }


def cpu_table(part: dict) -> str:
  head = ["model", "variant", "mesh", "rules", "batch", "compile s", "step ms (median)",
          "examples/s", "time vs 1 dev", "loss step 0", "abs diff vs 1 dev"]
  rows = []
  for r in part["rows"]:
    shape = ",".join(f"{k}={v}" for k, v in r["mesh_shape"].items() if v > 1) or "1 device"
    rows.append([
        r["model"], r["variant"], shape, str(r["rules"]), str(r["batch"]), f"{r['compile_s']:.1f}",
        f"{1e3 * r['step_s_median']:.1f}", f"{r['examples_per_s']:.0f}",
        f"{r['time_vs_1_device']:.2f}", f"{r['loss_step0']:.6f}",
        f"{r['loss_step0_diff_vs_1_device']:.1e}"])
  return markdown_table(head, rows) + f"\n\n{part['note']}"


# ------------------------------------------------------------- accelerator part
def _peaks(device_kind: str) -> tuple[float, float, float] | None:
  for key, peaks in _PEAKS:
    if key.lower() in device_kind.lower():
      return peaks
  return None


def accelerator_part() -> dict:
  import jax

  batches: dict[str, list[int]] = {}
  for entry in FLAGS.accel_batch:
    name, batch = entry.split(":")
    batches.setdefault(name, []).append(int(batch))
  kind = jax.devices()[0].device_kind
  peaks = _peaks(kind)
  on_cpu = jax.default_backend() == "cpu"
  rows, fwd_cache = [], {}
  for name in FLAGS.accel_models:
    _, _, _, preset_name = build_model(name)
    cnn = not is_transformer(preset_name)
    for batch in batches.get(name, [128]):
      for variant in FLAGS.accel_variants:
        inherited = variant == "inherited"
        for dtype in FLAGS.accel_dtypes:
          model_dtypes = [None]
          if cnn and dtype != "float32":
            model_dtypes = [dtype] + (["float32"] if FLAGS.cnn_trainer_dtype and not inherited else [])
          for model_dtype in model_dtypes:
            case = _case(name, batch, inherited=inherited, dtype=dtype,
                         model_dtype=model_dtype, mesh={"data": 1},
                         warmup=FLAGS.accel_warmup, steps=FLAGS.accel_steps)
            key = (name, batch, inherited)
            case["fwd_flops"] = FLAGS.fwd_flops and key not in fwd_cache
            logging.info("accelerator case %s", case)
            r = measure(case)
            if "flops_forward_x3" in r:
              fwd_cache[key] = r["flops_forward_x3"]
            r["flops_forward_x3"] = fwd_cache.get(key)
            flops = (r["flops_step_cpu_count"] or r["flops_per_device_xla"]
                     or r["flops_step_xla_unoptimized"])
            r["flops_step"] = flops
            r["tflops_per_s"] = flops / r["step_s_median"] / 1e12
            r["tflops_per_s_pipelined"] = flops / r["step_s_pipelined"] / 1e12
            if FLAGS.peak_tflops:
              peak, peak_name = FLAGS.peak_tflops, "--peak_tflops"
            elif peaks and not on_cpu:
              peak, peak_name = (peaks[0], "bf16 dense") if dtype == "bfloat16" else (
                  peaks[1], "tf32 dense")
            else:
              peak, peak_name = None, None
            r["peak_tflops"], r["peak"] = peak, peak_name
            r["mfu"] = r["tflops_per_s"] / peak if peak else None
            r["mfu_pipelined"] = r["tflops_per_s_pipelined"] / peak if peak else None
            if peaks and not on_cpu and dtype == "float32" and not FLAGS.peak_tflops:
              r["mfu_vs_fp32_cuda_cores"] = r["tflops_per_s"] / peaks[2]
            rows.append(r)
            logging.info("%s", r)
  return {
      "device_kind": kind,
      "backend": jax.default_backend(),
      "peaks_tflops_bf16_tf32_fp32": peaks,
      "peak_note": ("MFU: bfloat16 steps vs the dense bf16 peak, float32 steps vs the dense "
                    "TF32 peak (XLA's default precision uses TF32 for f32 dots/convs on "
                    "Ampere+); mfu_vs_fp32_cuda_cores uses the non-tensor-core f32 peak. "
                    "FLOPs: XLA cost analysis of the train step compiled for the CPU "
                    "backend (the GPU one leaves out cuDNN convolutions; multiply-add = 2)."),
      "matmul_precision": str(jax.config.jax_default_matmul_precision),
      "rows": rows,
  }


def accelerator_table(part: dict) -> str:
  head = ["model", "variant", "dtype", "model dtype", "batch", "params", "compile s", "step ms",
          "examples/s", "GFLOP/step (XLA)", "3x fwd GFLOP", "TFLOP/s", "MFU", "matmul dtypes"]
  rows = []
  for r in part["rows"]:
    fwd = r.get("flops_forward_x3")
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    rows.append([
        r["model"], r["variant"], r["dtype"], r["model_dtype"], str(r["batch"]),
        f"{r['params'] / 1e6:.2f}M", f"{r['compile_s']:.1f}", f"{1e3 * r['step_s_median']:.2f}",
        f"{r['examples_per_s']:.0f}", f"{r['flops_step'] / 1e9:.1f}",
        "-" if not fwd else f"{fwd / 1e9:.1f}", f"{r['tflops_per_s']:.2f}", mfu,
        str(r["matmul_dtypes"])])
  return (f"Device: {part['device_kind']} ({part['backend']}). {part['peak_note']}\n\n"
          + markdown_table(head, rows))


# ------------------------------------------------------------------------ main
def _child(spec: str) -> None:
  import jax

  cases = json.loads(spec)
  rows = []
  for case in cases:
    logging.info("child (%d devices): %s", jax.device_count(), case)
    rows.append(measure(case))
  print(_MARK + json.dumps(rows), flush=True)


def main(argv):
  del argv
  if FLAGS.child:
    _child(FLAGS.child)
    return
  parts = [p.strip() for p in FLAGS.parts if p.strip()]
  if FLAGS.accelerator:
    parts = ["accelerator"]
  if parts == ["auto"]:
    import jax

    parts = ["cpu"] if jax.default_backend() == "cpu" else ["accelerator"]
  unknown = set(parts) - {"cpu", "accelerator"}
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}")
  results: dict[str, Any] = {"argv": sys.argv[1:], "machine": f"{os.cpu_count()} CPU cores"}
  text = []
  if "cpu" in parts:
    results["cpu"] = cpu_part()
    text.append("## Sharded train step on simulated CPU devices\n\n" + cpu_table(results["cpu"]))
  if "accelerator" in parts:
    results["accelerator"] = accelerator_part()
    text.append("## Train step on one accelerator\n\n" + accelerator_table(results["accelerator"]))
  print("\n\n".join(text))
  with open(FLAGS.out, "w") as f:
    f.write(json.dumps(results, indent=2) + "\n")
  if "cpu" in results and not results["cpu"]["loss_check_ok"]:
    logging.error("sharded losses differ from the 1-device loss by more than %g", FLAGS.loss_tol)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)

"""Tests for configs/*.py: every variant builds, its methods resolve, its values feed the
real pipelines and optimizers, and InherNet at 'params:student' is no larger than the
student. Models are only traced (`jax.eval_shape`), never initialised."""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from inhernet_jax import models
from inhernet_jax.decomposition import accounting
from inhernet_jax.data import pipeline as data
from inhernet_jax.experiment import runs as experiment
from inhernet_jax.training import optim
from inhernet_jax.decomposition.spec import InherSpec

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load(name):
  """A config module loaded by path, as `ml_collections.config_flags` does."""
  spec = importlib.util.spec_from_file_location(f"_config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


CIFAR = load("cifar100")
VARIANTS = [
    ("digits", None), ("digits", "local"), ("digits", "sweep"), ("chars", None),
    ("chars", "local"), ("imagenet", None), ("vit", None), ("vit", "model=2,batch=512"),
    *[("cifar100", f"pair={pair}") for pair in CIFAR.PAIRS],
    ("fashion_mnist", None), ("fashion_mnist", "bn"), ("fashion_mnist", "local"),
    *[("fashion_mnist", f"pair={pair}") for pair in CIFAR.PAIRS],
]
ALL_METHODS = ["student", "student_kd", "student_dkd", "student_fitnet", "inherit", "inherit_kd",
               "inherit_random"]
# Training set sizes of the TFDS datasets (nothing is loaded).
TRAIN_SIZE = {"cifar100": 50_000, "imagenet2012": 1_281_167, "fashion_mnist": 60_000}
RESNET18_PARAMS = 11_689_512  # torchvision's resnet18.


def get(name, arg=None):
  return load(name).get_config(arg)


def zeros(tree):
  """Read-only zero arrays of a ShapeDtypeStruct tree (no memory: broadcast views).

  `accounting.rank_for_params` plans from shapes only but rejects ShapeDtypeStructs.
  """
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), tree)


def abstract_params(model, config):
  shape = (1, *data.input_shape(config.data))
  dtype = jnp.int32 if config.data.name == "chars" else jnp.float32
  init = lambda: model.init(jax.random.key(0), jnp.zeros(shape, dtype), train=False)
  return jax.eval_shape(init)["params"]


# ------------------------------------------------------------------ building
@pytest.mark.parametrize("name,arg", VARIANTS)
def test_every_variant_builds(name, arg):
  c = get(name, arg)
  assert isinstance(c, ml_collections.ConfigDict)
  for field in ("name", "seed", "seeds", "data", "batch_size", "epochs", "optimizer",
                "teacher", "method_defs", "methods", "sweep", "eval_batch_size"):
    assert field in c, field
  assert c.seeds >= 1 and c.epochs >= 1 and c.teacher.epochs >= 1
  assert c.data.name in data.NAMES
  assert c.teacher.model in models.NAMES
  for key, md in c.method_defs.items():
    if md.kind == "student":
      assert md.model in models.NAMES, key
    if md.get("preset") is not None:
      assert md.preset in models.PRESETS, key
  assert set(c.scratch_method.split(",")) <= set(experiment.method_names(c))


def test_variants_differ_where_documented():
  default, local = get("digits"), get("digits", "local")
  assert (default.seeds, local.seeds) == (3, 1)
  assert local.epochs < default.epochs and local.teacher.epochs < default.teacher.epochs
  assert get("digits", "seeds=2").seeds == 2
  assert get("digits", "variant=local,seeds=4").seeds == 4
  assert get("chars", "local").data.seq_len < get("chars").data.seq_len
  assert get("imagenet", "batch=256").optimizer.learning_rate == pytest.approx(0.1)
  assert get("imagenet").optimizer.learning_rate == pytest.approx(0.4)


@pytest.mark.parametrize("name,arg,match", [
    ("digits", "bogus", "bogus"),
    ("chars", "variant=sweep", "sweep"),
    ("cifar100", "pair=resnet18", "resnet18"),
    ("digits", "colour=red", "colour"),
    ("imagenet", "variant=local", "variant"),      # imagenet has no variant argument.
    ("cifar100", "epochs=many", "many"),
    ("imagenet", "batch=1.5", "1.5"),
])
def test_bad_arguments_raise_naming_them(name, arg, match):
  with pytest.raises(ValueError, match=match):
    get(name, arg)


def test_parse_arg():
  arg = common.parse_arg("local,seeds=2", variant="default", seeds=0, fast=False, lr=0.1)
  assert (arg.variant, arg.seeds, arg.fast, arg.lr) == ("local", 2, False, 0.1)
  arg = common.parse_arg("fast=TRUE,lr=1e-3", variant="default", seeds=0, fast=False, lr=0.1)
  assert arg.fast is True and arg.lr == 1e-3 and arg.variant == "default"
  assert common.parse_arg("", variant="x").variant == "x"
  with pytest.raises(ValueError, match="fast.*true or false"):
    common.parse_arg("fast=yes", variant="default", fast=False)
  with pytest.raises(ValueError, match="'nope' is not one of"):
    common.parse_arg("nope=1", variant="default")


# ------------------------------------------------------------------ methods
@pytest.mark.parametrize("name,arg,keys", [
    ("digits", None, ALL_METHODS),
    ("digits", "local", ALL_METHODS),
    ("chars", None, ["student", "student_kd", "inherit", "inherit_kd"]),
    ("chars", "local", ["student", "student_kd", "student_fitnet", "inherit", "inherit_kd"]),
    ("imagenet", None, ["student", "student_kd", "inherit", "inherit_kd"]),
    ("cifar100", None, ["student", "student_kd", "student_dkd", "inherit_small", "inherit_large"]),
])
def test_methods_resolve(name, arg, keys):
  c = get(name, arg)
  expanded = experiment.expand_methods(c)
  assert [k for k, _ in expanded] == keys
  for key, md in expanded:
    if md["kind"] == "inhernet":
      rank = md["rank"]
      assert isinstance(rank, int) or rank.split(":")[1] in c.method_defs, key
      assert md["heads"] >= 1
    # A student run before every 'params:<student>' reference.
    if isinstance(md.get("rank"), str):
      assert keys.index(md["rank"].split(":")[1]) < keys.index(key)


def test_sweep_expands_rank_x_heads():
  c = get("digits", "sweep")
  expanded = dict(experiment.expand_methods(c))
  want = [f"inherit_r{r}_h{h}" for r in (4, 8, 16, 32) for h in (1, 2, 3)]
  assert list(expanded) == ["student", *want]
  assert expanded["inherit_r16_h2"]["rank"] == 16
  assert expanded["inherit_r16_h2"]["heads"] == 2
  assert expanded["inherit_r16_h2"]["loss"] == "ce"


# ------------------------------------------------------------------ the paper's CIFAR-100 setup
def test_cifar100_pairs_are_the_papers():
  # The source of truth is the paper's setup as the project's notes transcribe it
  # ("resnet32x4 -> resnet8x4: 4/8; vgg13 -> vgg8: 128/256; ..."), beside the checkout.
  notes = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "paper-notes.md").read_text()
  setup = " ".join(notes[notes.index("InherNet \"Small\"/\"Large\" ranks:"):].split("Three heads")[0].split())
  papers = {(t, s, int(a), int(b))
            for t, s, a, b in re.findall(r"(\w+) -> (\w+): (\d+)/(\d+)", setup)}
  assert len(papers) == 7
  assert set(CIFAR.PAIRS.values()) == papers
  assert len(CIFAR.PAIRS) == len(papers)
  for teacher, student, _, _ in CIFAR.PAIRS.values():
    assert teacher in models.NAMES and student in models.NAMES


@pytest.mark.parametrize("pair", list(CIFAR.PAIRS))
def test_cifar100_recipe(pair):
  c = get("cifar100", f"pair={pair}")
  teacher, student, small, large = CIFAR.PAIRS[pair]
  assert c.teacher.model == teacher and c.method_defs.student.model == student
  o = c.optimizer
  assert (o.name, o.learning_rate, o.momentum, o.weight_decay) == ("sgd", 0.05, 0.9, 5e-4)
  assert (o.schedule, o.decay_factor, tuple(o.decay_epochs)) == ("step", 0.1, (150, 180, 210))
  assert (c.batch_size, c.epochs, c.teacher.epochs) == (64, 240, 240)
  assert c.data.name == "cifar100"
  small_def, large_def = c.method_defs.inherit_small, c.method_defs.inherit_large
  assert (small_def.rank, small_def.heads, small_def.loss) == (small, 3, "kd")
  assert (large_def.rank, large_def.heads, large_def.loss) == (large, 3, "ce")


def test_cifar100_epochs_scale_the_decays():
  c = get("cifar100", "epochs=24")
  assert (c.epochs, c.teacher.epochs) == (24, 24)
  assert tuple(c.optimizer.decay_epochs) == (15, 18, 21)


# ------------------------------------------------------------------ InherNet at the student's size
def _inherit_at_student_size(name, arg):
  """(teacher, student, inherited) parameter counts and the rank, all from shapes."""
  c = get(name, arg)
  num_classes = data.num_classes(c.data)
  teacher = models.create(c.teacher.model, num_classes=num_classes, **c.teacher.kwargs)
  teacher_params = abstract_params(teacher, c)
  md = c.method_defs.inherit
  assert md.rank == "params:student"
  sd = c.method_defs.student
  student = models.create(sd.model, num_classes=num_classes, **sd.kwargs)
  target = accounting.param_count(abstract_params(student, c))
  rules = models.preset(md.preset, c.teacher.model)
  rank = experiment._resolve_rank(md.rank, zeros(teacher_params), md.heads, rules,
                                  {"student": target}, "inherit")
  spec = InherSpec(rank=rank, heads=md.heads, rules=rules)
  inherited = accounting.param_count(abstract_params(teacher.clone(spec=spec), c))
  # The plan (no model) and the inherited model agree on the count.
  assert accounting.planned_param_count(zeros(teacher_params), spec) == inherited
  bigger = accounting.planned_param_count(zeros(teacher_params), spec.replace(rank=rank + 1))
  return accounting.param_count(teacher_params), target, inherited, rank, bigger


@pytest.mark.parametrize("name,arg", [
    ("digits", None), ("digits", "local"), ("chars", None), ("chars", "local"),
    ("fashion_mnist", None), ("fashion_mnist", "local"),
])
def test_inherit_is_no_larger_than_the_student(name, arg):
  teacher, student, inherited, rank, bigger = _inherit_at_student_size(name, arg)
  assert student < teacher
  assert inherited <= student
  assert bigger > student  # The largest such rank: one more exceeds the student.
  assert rank >= 2


def test_imagenet_inherit_at_resnet18_size():
  assert models.param_count("resnet18") == RESNET18_PARAMS
  teacher, student, inherited, rank, bigger = _inherit_at_student_size("imagenet", None)
  assert student == RESNET18_PARAMS
  assert teacher > 25_000_000  # resnet50 (25,557,032).
  assert inherited <= RESNET18_PARAMS < bigger
  assert rank >= 32


def test_vit_inherit_at_vit_s_size():
  teacher, student, inherited, rank, bigger = _inherit_at_student_size("vit", None)
  assert 22_000_000 < student < 22_200_000  # ViT-S/16 (22.1M).
  assert teacher > 86_000_000  # ViT-B/16.
  assert inherited <= student < bigger


def test_fashion_mnist_bn_compares_batch_norm_re_estimation():
  c = get("fashion_mnist", "bn")
  methods = experiment.method_names(c)
  assert methods == ["student", "inherit_plain", "inherit", "inherit_aware_plain", "inherit_aware"]
  got = {m: (bool(c.method_defs[m].get("data_aware", False)),
             bool(c.method_defs[m].get("recalibrate", False))) for m in methods[1:]}
  assert got == {"inherit_plain": (False, False), "inherit": (False, True),
                 "inherit_aware_plain": (True, False), "inherit_aware": (True, True)}
  assert c.data.train_examples == 12000
  assert get("fashion_mnist", "bn,train_examples=0").data.get("train_examples") is None
  # The pairs share their gate init: they differ only in the BatchNorm statistics.
  assert c.method_defs.inherit_plain.init_key == "inherit"
  assert c.method_defs.inherit_aware_plain.init_key == "inherit_aware"
  # Re-estimation is the default (experiment.RECALIBRATE); only the *_plain twins opt out.
  for m, md in get("fashion_mnist").method_defs.items():
    if md.kind == "inhernet":
      assert md.get("recalibrate", experiment.RECALIBRATE) == (not m.endswith("_plain")), m


def test_fashion_mnist_defaults_by_variant():
  got = {arg: (c.seeds, c.epochs, c.teacher.epochs, c.data.get("train_examples"))
         for arg in (None, "bn", "local", "seeds=2,epochs=5,train_examples=0")
         for c in [get("fashion_mnist", arg)]}
  assert got == {None: (3, 3, 8, 12000), "bn": (1, 3, 6, 12000), "local": (1, 1, 1, 512),
                 "seeds=2,epochs=5,train_examples=0": (2, 5, 8, None)}
  c = get("fashion_mnist")
  assert experiment.method_names(c) == ALL_METHODS + ["inherit_aware"]
  # Equal epochs for every method: none overrides the config's.
  assert all("epochs" not in md for md in c.method_defs.values())


@pytest.mark.parametrize("pair", list(CIFAR.PAIRS))
def test_fashion_mnist_pairs_take_the_cifar100_recipe(pair):
  c, cifar = get("fashion_mnist", f"pair={pair},seeds=3"), get("cifar100", f"pair={pair},epochs=30")
  assert c.data.name == "fashion_mnist" and "train_examples" not in c.data  # All 60,000.
  assert (c.seeds, c.epochs, c.teacher.epochs, c.batch_size) == (3, 30, 30, 64)
  assert c.optimizer.to_dict() == cifar.optimizer.to_dict()
  assert tuple(c.optimizer.decay_epochs) == (19, 22, 26)  # 150/180/210 of 240.
  assert c.method_defs.to_dict() == cifar.method_defs.to_dict()
  assert c.teacher.model == cifar.teacher.model and c.methods == cifar.methods
  assert get("fashion_mnist", f"pair={pair},epochs=8,teacher_epochs=16").teacher.epochs == 16


@pytest.mark.parametrize("pair", ["resnet32x4", "vgg13", "wrn_40_2"])
def test_fashion_mnist_pair_models_take_grey_28x28_images(pair):
  c = get("fashion_mnist", f"pair={pair}")
  assert data.input_shape(c.data) == (28, 28, 1)
  teacher = models.create(c.teacher.model, num_classes=10)
  params = abstract_params(teacher, c)
  small = c.method_defs.inherit_small
  spec = InherSpec(rank=small.rank, heads=small.heads,
                   rules=models.preset(small.preset, c.teacher.model))
  inherited = abstract_params(teacher.clone(spec=spec), c)
  student = abstract_params(models.create(c.method_defs.student.model, num_classes=10), c)
  sizes = [accounting.param_count(t) for t in (student, inherited, params)]
  assert sizes[1] < sizes[2] and sizes[0] < sizes[2], sizes


@pytest.mark.parametrize("arg", ["pair=resnet18", "variant=bn,pair=vgg13", "variant=pair"])
def test_fashion_mnist_bad_variants_raise_naming_them(arg):
  with pytest.raises(ValueError, match=arg.split("=")[-1]):
    get("fashion_mnist", arg)


def test_mesh_and_rules_are_config_fields():
  c = get("vit", "model=2")
  assert c.mesh.to_dict() == {"data": -1, "fsdp": 1, "model": 2}
  assert c.sharding_rules == "tensor_parallel"
  assert get("digits").sharding_rules == "default"


# ------------------------------------------------------------------ values feed the real code
@pytest.mark.parametrize("name,arg", VARIANTS)
def test_optimizer_builds_and_updates(name, arg):
  c = get(name, arg)
  train_size = c.data.get("train_examples") or TRAIN_SIZE.get(c.data.name)
  if train_size is None:
    steps_per_epoch = data.get(c.data, batch_size=c.batch_size, seed=0).steps_per_epoch
  else:
    steps_per_epoch = train_size // c.batch_size
  total = steps_per_epoch * c.epochs
  tx, schedule = optim.make_optimizer(c.optimizer, steps_per_epoch=steps_per_epoch,
                                      total_steps=total)
  peak = c.optimizer.learning_rate
  lrs = np.array([schedule(s) for s in (0, total // 2, total - 1)], np.float64)
  assert np.all(lrs >= 0) and np.all(lrs <= peak * (1 + 1e-6))
  assert lrs.max() > 0
  if c.optimizer.schedule == "step":
    first = c.optimizer.decay_epochs[0] * steps_per_epoch
    assert float(schedule(first - 1)) == pytest.approx(peak)
    assert float(schedule(first)) == pytest.approx(peak * c.optimizer.decay_factor)
  params = {"layer": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones((3,))}}
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  decay = c.optimizer.get("weight_decay", 0.0)
  kernel_moved = bool(jnp.any(updates["layer"]["kernel"] != 0))
  # Step 0 of a warmup has lr 0; otherwise weight decay alone moves the kernel.
  assert kernel_moved == (decay > 0 and float(schedule(0)) > 0)


@pytest.mark.parametrize("name,arg", [("digits", None), ("digits", "local"), ("chars", None),
                                      ("chars", "local")])
def test_data_pipeline_builds(name, arg):
  c = get(name, arg)
  p = data.get(c.data, batch_size=c.batch_size, seed=0, eval_batch_size=c.eval_batch_size)
  assert p.task.num_classes == data.num_classes(c.data)
  assert p.task.input_shape == data.input_shape(c.data)
  batch = p.train_batch(0)
  assert batch["input"].shape == (c.batch_size, *data.input_shape(c.data))
  assert next(p.eval_batches())["input"].shape[0] == c.eval_batch_size
  assert p.steps_per_epoch >= 1


@pytest.mark.parametrize("name,arg,classes,shape", [
    ("cifar100", None, 100, (32, 32, 3)),
    ("imagenet", None, 1000, (224, 224, 3)),
    ("vit", None, 1000, (224, 224, 3)),
])
def test_tfds_configs_are_well_formed(name, arg, classes, shape):
  c = get(name, arg)
  assert data.num_classes(c.data) == classes
  assert data.input_shape(c.data) == shape
  with pytest.raises(data.DatasetNotPreparedError):
    data.get(c.data.to_dict() | {"data_dir": "/nonexistent/tfds"}, batch_size=c.batch_size,
             seed=0)

"""Torch-free tests for `inhernet_jax.interop.convert` and `launch/convert.py`: names, errors and
the validation of untrusted files (weights, HF configs, sharded indexes).

They run everywhere: state dicts are NumPy arrays (``.safetensors`` written with
``safetensors.numpy``), built from our own model's variables in torchvision's layout.
The parity tests against PyTorch are in `convert_parity_test.py`.
"""

import json
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from absl import app, flags
from absl.testing import flagsaver

from inhernet_jax import InherSpec, models
from inhernet_jax.interop import convert
from inhernet_jax.interop import state_dict as convert_core
from inhernet_jax.interop import resnet as convert_resnet
from inhernet_jax.interop import export
from inhernet_jax.models import imagenet

WIDTH, CLASSES = 4, 5
_TO_TORCH = {convert_core._conv: lambda a: a.transpose(3, 2, 0, 1),
             convert_core._linear: lambda a: a.T, convert_core._vector: lambda a: a}


def _numpy_resnet18(seed=0):
  """(our variables, torchvision-named NumPy state dict) of a random width-4 ResNet-18."""
  model = imagenet.MODELS["resnet18"](num_classes=CLASSES, num_filters=WIDTH)
  abstract = convert.abstract_variables(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(seed)
  state, ours = {}, {}
  for leaf in convert_resnet._resnet_leaves("resnet18"):
    node = abstract
    for key in leaf.path:
      node = node[key]
    value = rng.uniform(0.5, 1.5, node.shape).astype(np.float32)  # Positive: valid variances.
    state[leaf.name] = np.ascontiguousarray(_TO_TORCH[leaf.fn](value))
    ours["/".join(leaf.path)] = value
  state["bn1.num_batches_tracked"] = np.array(3, np.int64)  # Ignored by default.
  return ours, state


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
  ours, state = _numpy_resnet18()
  path = tmp_path_factory.mktemp("resnet") / "resnet18.safetensors"
  safetensors.numpy.save_file(state, str(path))
  return ours, state, path


def test_torchvision_layout_round_trip(resnet18):
  ours, _, path = resnet18
  model, variables = convert.from_torchvision(path, "resnet18")
  assert (model.num_classes, model.num_filters) == (CLASSES, WIDTH)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x
          for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  assert flat.keys() == ours.keys()
  for key, value in ours.items():
    np.testing.assert_array_equal(flat[key], value, err_msg=key)


def test_missing_unexpected_and_mismatched_tensors_are_named(resnet18):
  _, state, _ = resnet18
  before = {k: v.copy() for k, v in state.items()}
  broken = {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}
  with pytest.raises(convert.ConversionError, match=r"missing in state_dict: layer1\.0\.conv1\."):
    convert.torchvision_resnet(broken, 18)
  with pytest.raises(convert.ConversionError, match=r"unexpected in state_dict.*extra\.w.* \(3,\)"):
    convert.torchvision_resnet({**state, "extra.weight": np.zeros(3, np.float32)}, 18)
  # ResNet-34 wants more blocks: named by their PyTorch names.
  with pytest.raises(convert.ConversionError, match=r"layer1\.2\.conv1\.weight"):
    convert.torchvision_resnet(state, 34)
  # A conv of the wrong width: our path, the PyTorch name and both shapes.
  wrong = {**state, "layer1.0.conv2.weight": np.zeros((WIDTH, WIDTH + 1, 3, 3), np.float32)}
  with pytest.raises(convert.ConversionError) as e:
    convert.from_torchvision(wrong, 18)
  assert "params/layer1_0/conv2/kernel (layer1.0.conv2.weight)" in str(e.value)
  assert f"(3, 3, {WIDTH + 1}, {WIDTH}) vs the model (3, 3, {WIDTH}, {WIDTH})" in str(e.value)
  with pytest.raises(convert.ConversionError, match=r"layer1\.0\.conv1\.weight: expected a conv"):
    convert.torchvision_resnet({**state, "layer1.0.conv1.weight": np.zeros(3, np.float32)}, 18)
  assert state.keys() == before.keys()  # Nothing mutated.
  jax.tree.map(np.testing.assert_array_equal, state, before)


@pytest.mark.parametrize("name, value, match", [
    ("layer1.0.conv1.weight", lambda a: a.astype(np.int8), "layer1.0.conv1.weight: dtype int8"),
    ("fc.weight", lambda a: a > 1.0, "fc.weight: dtype bool"),
    ("bn1.running_var", lambda a: np.where(np.arange(a.size) == 1, np.nan, a).astype(np.float32),
     r"bn1.running_var: 1 NaN/Inf value\(s\) of 4"),
    ("fc.bias", lambda a: np.full_like(a, np.inf), r"fc.bias: 5 NaN/Inf"),
])
def test_non_float_and_non_finite_weights_are_refused_by_name(resnet18, tmp_path, name, value,
                                                              match):
  _, state, _ = resnet18
  bad = {**state, name: value(state[name])}
  with pytest.raises(convert.ConversionError, match=match):
    convert.from_torchvision(bad, "resnet18")
  safetensors.numpy.save_file(bad, str(tmp_path / "bad.safetensors"))  # From a file too.
  with pytest.raises(convert.ConversionError, match=match):
    convert.from_torchvision(tmp_path / "bad.safetensors", "resnet18")


def test_match_variables_lists_every_difference():
  abstract = {"params": {"a": {"kernel": jax.ShapeDtypeStruct((2, 3), jnp.float32)},
                         "b": {"bias": jax.ShapeDtypeStruct((3,), jnp.float32)}},
              "intermediates": {"ignored": ()}}
  got = {"params": {"a": {"kernel": np.zeros((3, 2))}, "c": {"bias": np.zeros(1)}}}
  with pytest.raises(convert.ConversionError) as e:
    convert.match_variables(got, abstract, sources={"params/a/kernel": "a.weight"})
  text = str(e.value)
  assert "missing in the converted weights: params/b/bias (3,)" in text
  assert "unexpected in the converted weights: params/c/bias (1,)" in text
  assert "params/a/kernel (a.weight): the converted weights (3, 2) vs the model (2, 3)" in text
  ok = {"params": {"a": {"kernel": np.zeros((2, 3))}, "b": {"bias": np.zeros(3)}}}
  matched = convert.match_variables(ok, abstract)
  assert matched["params"]["a"]["kernel"].dtype == np.float32  # The model's dtype.
  assert ok["params"]["a"]["kernel"].dtype == np.float64  # Not mutated.
  with pytest.raises(convert.ConversionError, match=r"params/a/kernel \(a.weight\): dtype int8"):
    convert.match_variables({"params": {"a": {"kernel": np.zeros((2, 3), np.int8)},
                                        "b": {"bias": np.zeros(3)}}}, abstract,
                            sources={"params/a/kernel": "a.weight"})


def test_torch_older_than_2_6_is_refused(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(b"not read")
  fake = types.SimpleNamespace(__version__="2.5.1+cpu", load=lambda *a, **k: pytest.fail("loaded"))
  monkeypatch.setitem(sys.modules, "torch", fake)
  with pytest.raises(ImportError, match=r"torch 2.5.1\+cpu cannot load .* safely.*2\.6"):
    convert.load_state_dict(path)
  fake.__version__, fake.load = "2.6.0", lambda *a, **k: {"w": np.ones(2, np.float32)}
  assert convert.load_state_dict(path)["w"].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------- HF configs
_VIT = {"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "image_size": 8, "patch_size": 4, "num_labels": 3}


def _vit_dir(tmp_path, config=None, *, index=None, layers=1):
  """A tiny HF ViT directory (NumPy weights, transformers-4 names)."""
  rng = np.random.default_rng(0)
  state = {"vit.embeddings.cls_token": rng.normal(size=(1, 1, 8)),
           "vit.embeddings.position_embeddings": rng.normal(size=(1, 5, 8)),
           "vit.embeddings.patch_embeddings.projection.weight": rng.normal(size=(8, 3, 4, 4)),
           "vit.embeddings.patch_embeddings.projection.bias": rng.normal(size=(8,)),
           "vit.layernorm.weight": np.ones(8), "vit.layernorm.bias": np.zeros(8),
           "classifier.weight": rng.normal(size=(3, 8)), "classifier.bias": np.zeros(3)}
  for i in range(layers):
    layer = f"vit.encoder.layer.{i}"
    for name, shape in (("attention.attention.query", (8, 8)), ("attention.attention.key", (8, 8)),
                        ("attention.attention.value", (8, 8)),
                        ("attention.output.dense", (8, 8)), ("intermediate.dense", (16, 8)),
                        ("output.dense", (8, 16))):
      state[f"{layer}.{name}.weight"] = rng.normal(size=shape)
      state[f"{layer}.{name}.bias"] = rng.normal(size=shape[:1])
    for norm in ("layernorm_before", "layernorm_after"):
      state[f"{layer}.{norm}.weight"], state[f"{layer}.{norm}.bias"] = np.ones(8), np.zeros(8)
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  tmp_path.mkdir(parents=True, exist_ok=True)
  if index is None:
    safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
  else:
    safetensors.numpy.save_file(state, str(tmp_path / "part-1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  text = config if isinstance(config, str) else json.dumps(_VIT if config is None else config)
  (tmp_path / "config.json").write_text(text)
  return tmp_path


def test_a_valid_tiny_vit_directory_converts(tmp_path):
  model, variables = convert.from_hf(_vit_dir(tmp_path))
  assert model.depth == 1 and variables["params"]["head"]["kernel"].shape == (8, 3)


@pytest.mark.parametrize("config, match", [
    ("[1, 2]", "a HF config must be a JSON object, got a list"),
    ("{not json", "not valid JSON"),
    ({k: v for k, v in _VIT.items() if k != "hidden_size"}, "hidden_size is missing"),
    ({**_VIT, "hidden_size": "8"}, "hidden_size must be a positive int, got '8'"),
    ({**_VIT, "num_attention_heads": 0}, "num_attention_heads must be a positive int, got 0"),
    ({**_VIT, "num_attention_heads": 3}, "hidden_size=8 is not divisible by num_attention_heads=3"),
    ({**_VIT, "num_labels": 0}, "num_labels must be an int >= 1"),
    ({**_VIT, "id2label": [1]}, "id2label must be an object"),
    ({**_VIT, "patch_size": True}, "patch_size must be a positive int"),
    ({**_VIT, "layer_norm_eps": -1}, "layer_norm_eps must be a number > 0"),
    ({**_VIT, "num_hidden_layers": 10**6}, "num_hidden_layers=1000000 is beyond any real model"),
    ({**_VIT, "num_hidden_layers": 500}, r"num_hidden_layers=500, but the vit weights hold "
                                         r"layers 0..0 \(1\)"),
])
def test_malformed_hf_configs_are_one_clear_error(tmp_path, config, match):
  import time

  t0 = time.perf_counter()
  with pytest.raises(convert.ConversionError, match=match):
    convert.from_hf(_vit_dir(tmp_path, config))
  assert time.perf_counter() - t0 < 10  # num_hidden_layers=10**6 took 59 s.


@pytest.mark.parametrize("index, match", [
    ({"metadata": {}}, "weight_map is missing"),
    ({"weight_map": []}, "weight_map is missing or not a non-empty object"),
    ({"weight_map": {"a": 3}}, r"weight_map\['a'\] must be a file name"),
    ({"weight_map": {"a": "../outside.safetensors"}}, "points outside the model directory"),
    ({"weight_map": {"a": "/etc/passwd"}}, "points outside the model directory"),
])
def test_sharded_index_is_checked_and_stays_inside_the_directory(tmp_path, index, match):
  (tmp_path / "outside.safetensors").write_bytes(b"")
  with pytest.raises(convert.ConversionError, match=match):
    convert.from_hf(_vit_dir(tmp_path / "model", index=index))


def test_sharded_index_inside_the_directory_loads(tmp_path):
  model, _ = convert.from_hf(_vit_dir(tmp_path, index={"weight_map": {"x": "part-1.safetensors"}}))
  assert model.depth == 1


# ------------------------------------------------------------------- launch/convert
@pytest.fixture
def parsed_flags():
  from launch import convert as launch_convert  # Defines its flags.

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return launch_convert


def test_launch_convert_inherits_and_exports(parsed_flags, resnet18, tmp_path, capsys):
  _, _, weights = resnet18
  out = tmp_path / "out"
  with flagsaver.flagsaver(torchvision="resnet18", weights=str(weights), rank="0.5",
                           heads=2, out=str(out)):
    parsed_flags.main(["convert"])
  variables, spec = export.load(out)
  assert spec == InherSpec(rank=0.5, heads=2, rules=models.preset("default", "resnet18"))
  text = capsys.readouterr().out
  assert "layer1_0/conv1/kernel" in text and "inherited" in text
  assert (out / "report.md").is_file()
  meta = export.load_spec(out / "spec.json")[1]
  assert (meta["model"], meta["num_filters"], meta["num_classes"]) == ("resnet18", WIDTH, CLASSES)
  assert variables["params"]["layer1_0"]["conv1"]["up"]["kernel"].shape == (2, 2, WIDTH)
  assert variables["batch_stats"]["layer1_0"]["bn1"]["mean"].shape == (WIDTH,)
  # Only converting: the teacher with a null spec.
  with flagsaver.flagsaver(torchvision="resnet18", weights=str(weights), out=str(tmp_path / "t")):
    parsed_flags.main(["convert"])
  teacher, spec = export.load(tmp_path / "t")
  assert spec is None
  jax.tree.map(np.testing.assert_array_equal, teacher,
               convert.from_torchvision(weights, 18)[1])
  # Refusals: an existing export, a missing weights file (with how to get it).
  with flagsaver.flagsaver(torchvision="resnet18", weights=str(weights), out=str(out)):
    with pytest.raises(app.UsageError, match="already holds an export"):
      parsed_flags.main(["convert"])
  # Weights files' failures are one `error:` line on stderr and exit status 1.
  capsys.readouterr()
  with flagsaver.flagsaver(torchvision="resnet50", weights=str(tmp_path / "no.pth"),
                           out=str(tmp_path / "x")):
    with pytest.raises(SystemExit, match="1"):
      parsed_flags.main(["convert"])
  assert re.match(r"error: .*no\.pth.*resnet50\(weights='IMAGENET1K_V2'\)", capsys.readouterr().err)
  with flagsaver.flagsaver(hf="bert", weights=str(tmp_path / "none"), out=str(tmp_path / "x")):
    with pytest.raises(SystemExit, match="1"):
      parsed_flags.main(["convert"])
  assert re.match(r"error: .*model.safetensors", capsys.readouterr().err)
  assert not (tmp_path / "x").exists()

"""Parity tests for `inhernet_jax.interop.convert` against PyTorch (they need torch; the
torch-free tests, errors and validation, are in `convert_test.py`).

Parity: our converted model's logits against the PyTorch model's on the same input,
PyTorch in float64 (the weights are float32 values, so the only difference is our
float32 arithmetic). ResNets: a from-scratch PyTorch reference with torchvision's
architecture and state-dict names (torchvision is not installed in CI; the real one is
tested when it is), at width 4 on 32x32 images. HF ViT and BERT: tiny random models
from `transformers`, saved with ``save_pretrained``. Every norm, bias and BatchNorm
running statistic is random (their defaults, 0 / 1, hide transposition and naming bugs).
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inhernet_jax import InherSpec, models
from inhernet_jax.interop import convert
from inhernet_jax.interop import export
from inhernet_jax import inherit

torch = pytest.importorskip("torch")
torch.set_num_threads(1)
nn = torch.nn

RTOL, ATOL = 1e-4, 1e-6  # Observed: ~1e-7 of the largest logit.
WIDTH, CLASSES, SIZE = 4, 5, 32
LAYOUTS = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}


# ------------------------------------------------------------ reference (torchvision)
class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
  """ResNet v1.5: the stride is on the 3x3 conv."""

  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
  """torchvision.models.ResNet with a free width (torchvision's is 64)."""

  def __init__(self, block, layers, num_classes, width=64):
    super().__init__()
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    for i, n in enumerate(layers):
      setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2**i, n, 1 if i == 0 else 2))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

  def _make_layer(self, block, planes, blocks, stride):
    downsample = None
    if stride != 1 or self.inplanes != planes * block.expansion:
      downsample = nn.Sequential(
          nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
          nn.BatchNorm2d(planes * block.expansion))
    layers = [block(self.inplanes, planes, stride, downsample)]
    self.inplanes = planes * block.expansion
    layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize(net, norm_types=(nn.BatchNorm2d, nn.LayerNorm)):
  """Non-trivial norm affines, BatchNorm running stats and biases."""
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, norm_types):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
      if isinstance(m, nn.Linear) and m.bias is not None:
        m.bias.normal_(0, 0.2)
  return net.eval()


def _nhwc(x):
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1), jnp.float32)


def _logits(net, *args, **kwargs):
  """The float64 PyTorch reference."""
  with torch.no_grad():
    out = net.double()(*args, **kwargs)
  net.float()
  return (out.logits if hasattr(out, "logits") else out).numpy()


def _assert_parity(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=ATOL)
  assert np.abs(want).max() > 0.05  # Not a vacuous comparison of near-zeros.


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def resnets(tmp_path_factory):
  """depth -> (net, .pth path, .safetensors path, input, float64 logits)."""
  import safetensors.torch

  root = tmp_path_factory.mktemp("resnets")
  out = {}
  for depth, (block, layers) in LAYOUTS.items():
    torch.manual_seed(depth)
    block = BasicBlock if block == "basic" else Bottleneck
    net = _randomize(ResNet(block, layers, CLASSES, WIDTH))
    pth, st = root / f"resnet{depth}.pth", root / f"resnet{depth}.safetensors"
    torch.save(net.state_dict(), pth)
    safetensors.torch.save_file(net.state_dict(), st)
    x = torch.randn(2, 3, SIZE, SIZE)
    out[depth] = (net, pth, st, x, _logits(net, x.double()))
  return out


# ---------------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("depth", sorted(LAYOUTS))
def test_resnet_parity(resnets, depth):
  net, pth, st, x, want = resnets[depth]
  model, variables = convert.from_torchvision(pth, f"resnet{depth}")
  assert (model.num_classes, model.num_filters, model.spec) == (CLASSES, WIDTH, None)
  _assert_parity(model.apply(variables, _nhwc(x), train=False), want)
  # The .safetensors file gives the same variables, bit for bit.
  _assert_same_tree(convert.from_torchvision(st, depth)[1], variables)
  np.testing.assert_array_equal(variables["batch_stats"]["layer1_0"]["bn1"]["var"],
                                net.layer1[0].bn1.running_var.numpy())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_real_torchvision_resnet(arch):
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  net = _randomize(getattr(torchvision.models, arch)(weights=None, num_classes=CLASSES))
  x = torch.randn(1, 3, 64, 64)
  model, variables = convert.from_torchvision(net.state_dict(), arch)
  _assert_parity(model.apply(variables, _nhwc(x), train=False), _logits(net, x.double()))


def test_load_state_dict_wrappers_dtypes_and_missing_torch(tmp_path, monkeypatch):
  path = tmp_path / "ckpt.pt"
  weights = {"module.w": torch.arange(4, dtype=torch.float64),
             "module.h": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
             "module.n": torch.tensor(7)}
  torch.save({"epoch": 3, "state_dict": weights}, path)
  flat = convert.load_state_dict(path)
  assert sorted(flat) == ["h", "n", "w"]
  assert (flat["w"].dtype, flat["h"].dtype, flat["n"].dtype) == (np.float32, np.float32, np.int64)
  kept = convert.load_state_dict(path, dtype=None)
  assert kept["w"].dtype == np.float64 and kept["h"].dtype.name == "bfloat16"
  np.testing.assert_array_equal(kept["h"].astype(np.float32), [1.5, -2.25])
  with pytest.raises(FileNotFoundError, match="nothing.pth"):
    convert.from_torchvision(tmp_path / "nothing.pth", "resnet50")
  with pytest.raises(FileNotFoundError, match="IMAGENET1K_V2"):
    convert.from_torchvision(tmp_path / "nothing.pth", "resnet50")
  monkeypatch.setitem(sys.modules, "torch", None)  # As if torch were not installed.
  with pytest.raises(ImportError, match="pip install torch.*safetensors"):
    convert.load_state_dict(path)


# ------------------------------------------------------------------- Hugging Face
def _v4_vit_name(key: str) -> str:
  """transformers-5 ViT names -> the transformers-4 names of the Hub's files."""
  for new, old in ((r"layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
                   ("attention.k_proj", "attention.attention.key"),
                   ("attention.v_proj", "attention.attention.value"),
                   ("attention.o_proj", "attention.output.dense"),
                   ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
    key = key.replace(new, old)
  return key


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  config = transformers.ViTConfig(image_size=SIZE, patch_size=8, hidden_size=32,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=CLASSES)
  torch.manual_seed(1)
  net = _randomize(transformers.ViTForImageClassification(config))
  path = tmp_path_factory.mktemp("hf") / "vit"
  net.save_pretrained(path)
  x = torch.randn(2, 3, SIZE, SIZE)
  return net, path, x, _logits(net, pixel_values=x.double())


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
  transformers = pytest.importorskip("transformers")
  config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=24, num_labels=3,
                                   initializer_range=0.2)
  torch.manual_seed(2)
  net = _randomize(transformers.BertForSequenceClassification(config))
  path = tmp_path_factory.mktemp("hf") / "bert"
  net.save_pretrained(path)
  ids = torch.randint(0, 100, (2, 12))
  types = torch.randint(0, 2, (2, 12))
  mask = torch.ones(2, 12, dtype=torch.long)
  mask[1, 7:] = 0  # The second sequence is padded.
  inputs = dict(input_ids=ids, token_type_ids=types, attention_mask=mask)
  return net, path, inputs, _logits(net, **inputs)


def test_hf_vit_parity_and_key_schemes(hf_vit, tmp_path):
  net, path, x, want = hf_vit
  model, variables = convert.from_hf(path)
  assert (model.pool_type, model.norm_eps, model.num_classes) == ("tok", 1e-12, CLASSES)
  _assert_parity(model.apply(variables, _nhwc(x), train=False), want)
  state = net.state_dict()
  assert any(".q_proj." in k for k in state)  # transformers 5 names here.
  # The Hub's transformers-4 names convert to the same variables.
  old = {_v4_vit_name(k): v for k, v in state.items()}
  assert "vit.encoder.layer.1.attention.attention.query.weight" in old
  config = json.loads((path / "config.json").read_text())
  _assert_same_tree(convert.hf_vit(old, config), variables)
  # ViTModel: no "vit." prefix, a pooler (ignored by default) and no classifier.
  base = {k[len("vit."):]: v for k, v in old.items() if k.startswith("vit.")}
  base |= {"pooler.dense.weight": torch.zeros(32, 32), "pooler.dense.bias": torch.zeros(32)}
  with pytest.raises(convert.ConversionError, match=r"missing in state_dict: classifier\.weight"):
    convert.hf_vit(base, config)
  headless = convert.hf_vit(base, config, init_head=True)
  assert not headless["params"]["head"]["kernel"].any()
  assert headless["params"]["head"]["kernel"].shape == (32, CLASSES)
  with pytest.raises(convert.ConversionError, match=r"unexpected in state_dict.*pooler\.dense\."):
    convert.hf_vit(base, config, init_head=True, ignore=())
  # The nn.scan layout: the same arrays stacked on a layer axis.
  scanned = convert.hf_vit(path / "model.safetensors", config, scan=True)["params"]["blocks"]
  np.testing.assert_array_equal(scanned["attn"]["query"]["kernel"][1],
                                variables["params"]["block_1"]["attn"]["query"]["kernel"])
  convert.match_variables({"params": {**{k: v for k, v in variables["params"].items()
                                         if not k.startswith("block_")}, "blocks": scanned}},
                          convert.abstract_variables(convert.hf_model(config, scan=True),
                                                     convert.hf_example_input(config)))


def test_hf_bert_parity_with_mask_and_token_types(hf_bert):
  net, path, inputs, want = hf_bert
  model, variables = convert.from_hf(path, "bert")
  args = {k: jnp.asarray(v.numpy()) for k, v in inputs.items()}
  got = model.apply(variables, args["input_ids"], train=False, token_types=args["token_type_ids"],
                    mask=args["attention_mask"])
  _assert_parity(got, want)
  unmasked = model.apply(variables, args["input_ids"], train=False,
                         token_types=args["token_type_ids"])
  assert np.abs(np.asarray(unmasked)[1] - want[1]).max() > 1e-3  # The mask mattered.


def test_hf_bert_old_names_pretraining_heads_and_errors(hf_bert):
  transformers = pytest.importorskip("transformers")
  net, path, _, _ = hf_bert
  config = json.loads((path / "config.json").read_text())
  variables = convert.from_hf(path)[1]
  # The oldest checkpoints: LayerNorm gamma / beta, and a position_ids buffer.
  old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                  "LayerNorm.beta"): v
         for k, v in net.state_dict().items()}
  old["bert.embeddings.position_ids"] = torch.arange(24)[None]
  _assert_same_tree(convert.hf_bert(old, config), variables)
  # BertForPreTraining: the MLM / NSP heads are ignored by default, and there is no classifier.
  pretraining = transformers.BertForPreTraining(transformers.BertConfig(**{
      k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}))
  state = pretraining.state_dict()
  with pytest.raises(convert.ConversionError, match=r"missing in state_dict: classifier\.weight"):
    convert.hf_bert(state, config)
  assert convert.hf_bert(state, config, init_head=True)["params"]["head"]["bias"].shape == (3,)
  with pytest.raises(convert.ConversionError, match=r"unexpected in state_dict.*cls\.predictions"):
    convert.hf_bert(state, config, init_head=True, ignore=())
  with pytest.raises(convert.ConversionError, match="hidden_act 'relu'"):
    convert.hf_bert(state, {**config, "hidden_act": "relu"})
  with pytest.raises(convert.ConversionError, match="model_type 'bert', expected 'vit'"):
    convert.from_hf(path, "vit")


def test_converted_teacher_inherits(hf_vit):
  """Full rank: the inherited network computes the teacher; rank 4: the student's tree."""
  _, path, x, want = hf_vit
  model, variables = convert.from_hf(path)
  rules = models.preset("default", "vit_b16")
  full = InherSpec(rank=1.0, heads=2, skip_if_no_saving=False, rules=rules)
  student = model.clone(spec=full)
  params = inherit(variables["params"], full)
  got = student.apply({"params": params}, _nhwc(x), train=False)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-3, atol=1e-4)
  spec = InherSpec(rank=4, heads=3, rules=rules)
  params = inherit(variables["params"], spec)
  config = json.loads((path / "config.json").read_text())
  abstract = convert.abstract_variables(model.clone(spec=spec), convert.hf_example_input(config))
  convert.match_variables({"params": params}, abstract)
  assert params["block_0"]["attn"]["query"]["down"]["kernel"].shape == (32, 4)


# ------------------------------------------------------ BatchNorm re-estimation (PyTorch)
def test_batch_norm_re_estimation_is_pytorch_momentum_none(resnets, tmp_path):
  """`recalibrate_batch_stats` on a converted teacher equals PyTorch's cumulative
  average (``momentum=None``, training mode) on the same batches, and an inherited
  network converted from PyTorch takes the same path."""
  import copy

  from inhernet_jax.calibration.batch_stats import recalibrate_batch_stats

  net, pth = resnets[18][:2]
  model, variables = convert.from_torchvision(pth, 18)
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(3, SIZE, SIZE, 3)).astype(np.float32) for _ in range(3)]
  ref = copy.deepcopy(net).double()
  for m in ref.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = None
      m.reset_running_stats()
  ref.train()
  with torch.no_grad():
    for x in xs:
      ref(torch.from_numpy(x.transpose(0, 3, 1, 2)).double())
  torch.save(ref.float().state_dict(), tmp_path / "recalibrated.pth")
  want = convert.from_torchvision(tmp_path / "recalibrated.pth", 18)[1]["batch_stats"]
  got = recalibrate_batch_stats(model, variables, xs)
  assert jax.tree.structure(got["batch_stats"]) == jax.tree.structure(want)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-5),
               got["batch_stats"], want)
  # The inherited network: every statistic re-estimated, params untouched.
  spec = InherSpec(rank=0.5, heads=2, rules=models.preset("default", "resnet18"))
  student = model.clone(spec=spec)
  inherited = dict(variables, params=inherit(variables["params"], spec))
  out = recalibrate_batch_stats(student, inherited, xs)
  assert out["params"] is inherited["params"]
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), out["batch_stats"],
                         variables["batch_stats"])
  assert all(jax.tree.leaves(changed))

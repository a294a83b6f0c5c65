"""Sentence encoders: a tiny random BERT directory written here, parity with transformers,
pooling config, the distillation students and the launcher (resume included)."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from configs import minilm
from inhernet_jax.decomposition import accounting
from inhernet_jax.interop import sentence
from inhernet_jax.data import text
from inhernet_jax.experiment import sentence_distill as sd
from inhernet_jax.interop.checks import ConversionError

WIDTH, DEPTH, HEADS, MLP, MAX_POS = 32, 4, 2, 64, 24
NOUNS = "cat dog file list value name string module class function".split()
VERBS = "returns reads writes opens closes sorts copies parses".split()
ADJS = "small large empty new old given".split()


def _sentences(n):
  rng = np.random.default_rng(0)
  return [f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the "
          f"{rng.choice(NOUNS)} of a {rng.choice(ADJS)} {rng.choice(NOUNS)}." for _ in range(n)]


def _write_tokenizer(path, words):
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

  vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                      + sorted(words) + ["."])}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(os.path.join(path, "tokenizer.json"))
  return len(vocab)


def _write_bert(path, vocab, seed=0):
  """A random BertModel checkpoint with HF names, written without torch."""
  rng = np.random.default_rng(seed)
  w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
  ln = lambda: (1 + w(WIDTH), w(WIDTH))  # noqa: E731
  sd_ = {"embeddings.word_embeddings.weight": w(vocab, WIDTH),
         "embeddings.position_embeddings.weight": w(MAX_POS, WIDTH),
         "embeddings.token_type_embeddings.weight": w(2, WIDTH)}
  sd_["embeddings.LayerNorm.weight"], sd_["embeddings.LayerNorm.bias"] = ln()
  for i in range(DEPTH):
    p = f"encoder.layer.{i}."
    for name, (o, n) in {"attention.self.query": (WIDTH, WIDTH), "attention.self.key": (WIDTH, WIDTH),
                         "attention.self.value": (WIDTH, WIDTH),
                         "attention.output.dense": (WIDTH, WIDTH),
                         "intermediate.dense": (MLP, WIDTH), "output.dense": (WIDTH, MLP)}.items():
      sd_[p + name + ".weight"], sd_[p + name + ".bias"] = w(o, n), w(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      sd_[p + name + ".weight"], sd_[p + name + ".bias"] = ln()
  safetensors.numpy.save_file(sd_, os.path.join(path, "model.safetensors"))
  config = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab,
            "hidden_size": WIDTH, "num_hidden_layers": DEPTH, "num_attention_heads": HEADS,
            "intermediate_size": MLP, "max_position_embeddings": MAX_POS, "type_vocab_size": 2,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
            "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02}
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)


def _write_pooling(path, **modes):
  os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
  cfg = {"word_embedding_dimension": WIDTH, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
         "pooling_mode_mean_sqrt_len_tokens": False, **modes}
  with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
    json.dump(cfg, f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_bert"))
  vocab = _write_tokenizer(path, set(NOUNS + VERBS + ADJS + ["the", "of", "a"]))
  _write_bert(path, vocab)
  _write_pooling(path, pooling_mode_mean_tokens=True)
  with open(os.path.join(path, "modules.json"), "w") as f:
    json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize"}], f)
  corpus = os.path.join(path, "sentences.txt")
  with open(corpus, "w") as f:
    f.write("\n".join(_sentences(200)))
  return path, corpus


@pytest.fixture(scope="module")
def enc(tiny):
  return sentence.load(tiny[0], max_len=16)


def test_load_reads_pooling_normalize_and_pads(enc):
  assert enc.model.pooling == "mean" and enc.model.normalize
  assert enc.model.depth == DEPTH and "pooler" not in enc.params and "head" not in enc.params
  ids, mask = sentence.tokenize(enc.tokenizer, ["The cat reads the file.", "A dog."])
  assert ids.shape == mask.shape == (2, 16)
  assert ids[0, 0] == 2 and mask[1].sum() == 5 and ids[1, 5:].tolist() == [0] * 11
  emb = sentence.encode(enc, enc.params, _sentences(5), batch_size=4)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)


def test_parity_with_transformers(tiny, enc):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  sents = _sentences(6) + ["A cat.", "The old module opens the new list of a given string."]
  got = sentence.encode(enc, enc.params, sents, batch_size=4)
  want = sentence.reference_embeddings(tiny[0], sents, 16)
  assert sentence.relative_error(got, want) <= 1e-4
  # The check can fail: one changed weight moves the embeddings well past the tolerance
  # (one entry: a shift of every entry is what the LayerNorm after it removes).
  fc2 = enc.params["block_1"]["mlp"]["fc2"]
  mlp = {**enc.params["block_1"]["mlp"], "fc2": {**fc2, "bias": fc2["bias"] + np.eye(WIDTH, dtype=np.float32)[0] * 0.1}}
  params = {**enc.params, "block_1": {**enc.params["block_1"], "mlp": mlp}}
  assert sentence.relative_error(sentence.encode(enc, params, sents, batch_size=4), want) > 1e-3


def test_pool_modes():
  h = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  m = np.array([[1, 1, 0], [1, 0, 0]], bool)
  np.testing.assert_allclose(sentence.pool(h, m, "mean")[0], h[0, :2].mean(0))
  np.testing.assert_allclose(sentence.pool(h, m, "max")[1], h[1, 0])
  np.testing.assert_allclose(sentence.pool(h, m, "cls"), h[:, 0])
  np.testing.assert_allclose(sentence.pool(h, m, "mean_sqrt_len")[0], h[0, :2].sum(0) / np.sqrt(2))


def test_pooling_config_errors_name_the_field(tmp_path):
  _write_pooling(tmp_path, pooling_mode_weightedmean_tokens=True)
  with pytest.raises(ConversionError, match="pooling_mode_weightedmean_tokens"):
    sentence.read_pooling(tmp_path)
  _write_pooling(tmp_path, pooling_mode_cls_token=True, pooling_mode_mean_tokens=True)
  with pytest.raises(ConversionError, match="exactly one"):
    sentence.read_pooling(tmp_path)
  _write_pooling(tmp_path, pooling_mode_cls_token=True)
  assert sentence.read_pooling(tmp_path) == "cls"
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    sentence.load_tokenizer(tmp_path, 8)


def test_students_fit_budgets(enc):
  for fraction in (0.5, 0.25):
    target = sd.encoder_budget(enc.params, fraction)
    for method in ("uniform", "allocated"):
      spec = sd.student_spec(method, enc.params, target, heads=2)
      from inhernet_jax.decomposition.transform import planned_param_count

      count = planned_param_count(enc.params, spec)
      assert count <= target
      # Embeddings are untouched; the encoder is at most the fraction.
      assert count - (accounting.param_count(enc.params) - sd.encoder_params(enc.params)) <= \
          fraction * sd.encoder_params(enc.params)
  assert sd.layer_indices(6, 3) == [1, 3, 5] and sd.layer_indices(6, 2) == [2, 5]
  assert sd.layer_indices(4, 1) == [3] and sd.baseline_layers(6, 0.25) == 2
  model, params, idx = sd.layer_drop(enc.model, enc.params, 2)
  assert idx == [1, 3] and model.depth == 2
  assert params["block_0"] is enc.params["block_1"] and "block_2" not in params
  assert sd.encoder_params(params) * 2 == sd.encoder_params(enc.params)


def test_agreement_and_loss():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(30, 8))
  same = sd.agreement(t, t)
  assert same == {"cosine": pytest.approx(1.0), "top1": 1.0, "top10": 1.0}
  noisy = sd.agreement(t + rng.normal(scale=1.0, size=t.shape), t)
  assert noisy["cosine"] < 0.9 and noisy["top1"] < 1.0 and noisy["top10"] < 1.0
  assert float(sd.embedding_loss(t, 2 * t)) == pytest.approx(0.0, abs=1e-6)
  assert float(sd.embedding_loss(t, -t)) == pytest.approx(2.0)
  a, b = sd.batch_indices(7, 5, 1, 0), sd.batch_indices(7, 5, 1, 0)
  assert a.tolist() == b.tolist() and len(a) == 5 and set(a) <= set(range(7))


def test_stdlib_sentences_are_prose():
  data = text.stdlib_sentences()
  assert len(data.train) > 1000 and len(data.held_out) > 200
  assert not set(data.train) & set(data.held_out)
  assert all(text.keep(s) for s in data.train[:100])
  assert not text.keep("Return x.foo(bar) for the given value.")
  with pytest.raises(FileNotFoundError, match="config.data.path"):
    text.get("file", "/nonexistent")


@pytest.mark.slow
def test_launcher_runs_and_resumes(tiny, tmp_path):
  from launch import sentence_distill as launcher

  path, corpus = tiny
  config = minilm.get_config(f"local,model_dir={path},source=file,path={corpus}")
  config.fractions = (0.5,)
  rows = launcher.run(config, str(tmp_path))
  keys = [r["key"] for r in rows]
  assert keys == ["teacher", "uniform_50", "allocated_50", "data_aware_50", "layer_drop_50"]
  for r in rows[1:]:
    assert r["params"] <= r["budget"] or r["method"] == "layer_drop"
    assert r["encoder_fraction"] <= 0.5 + 1e-9 and r["sentences_per_s"] > 0
    assert -1 <= r["after"]["cosine"] <= 1 and 0 <= r["after"]["top10"] <= 1
  assert rows[1]["before"]["cosine"] < 1.0  # Truncated: not the teacher.
  assert os.path.isfile(tmp_path / "results.md")
  # Killed after its last checkpoint: the student is restored, not retrained or reset.
  os.remove(tmp_path / "uniform_50" / "result.json")
  again = launcher.run(config, str(tmp_path))
  assert again[1]["after"] == rows[1]["after"] and again[1]["before"] == rows[1]["before"]
  # Throughput measured back to back replaces the run's figures in the report.
  speed = launcher.throughput_only(config, str(tmp_path))
  assert sorted(speed) == sorted(keys) and min(speed.values()) > 0
  # A partial run's report: the finished students, the others named as missing.
  config.fractions = (0.5, 0.25)
  partial = launcher.report(config, str(tmp_path))
  assert [r["key"] for r in partial] == keys
  assert [r["sentences_per_s"] for r in partial] == [speed[k] for k in keys]
  with open(tmp_path / "results.json") as f:
    assert json.load(f)["missing"] == [k.replace("50", "25") for k in keys[1:]]

"""`inhernet_jax.experiment.records`: the typed method definitions and run records (no training)."""

import dataclasses
import importlib.util
import inspect
import json
import pathlib

import hypothesis
import ml_collections
import pytest
from hypothesis import strategies as st

from inhernet_jax.decomposition import budget
from inhernet_jax.experiment import runs as experiment
from inhernet_jax.experiment import report
from inhernet_jax.experiment import validate
from inhernet_jax.experiment.records import MethodDef, RunRecord

ROOT = pathlib.Path(__file__).parents[1]

# A record as `launch.main --config=configs/digits.py:local` wrote it into results.json
# (history shortened to two epochs).
REAL = json.loads("""{
 "method": "inherit_random", "label": "InherNet H=3, random init", "kind": "inhernet",
 "loss": "ce", "seed": 0, "rank": 4, "heads": 3, "init": "random", "params": 2472,
 "flops": 23799.0, "metric_name": "accuracy", "higher_is_better": true,
 "metric_at_init": 0.11666666666666667, "final_metric": 0.37222222222222223,
 "best_metric": 0.37222222222222223, "epochs_to_scratch": 2.0, "wall_s": 3.0774327260000405,
 "history": {"epoch": [0, 1, 2], "train_loss": [null, 2.29, 2.21],
             "test_metric": [0.11666666666666667, 0.25, 0.37222222222222223]},
 "gates": {"conv": {"entropy": 1.0944794416427612, "load": [0.368, 0.337, 0.295],
                    "max_entropy": 1.0986122886681098}},
 "calibration_batches": {"data_aware": 0, "batch_stats": 0}
}""")


def _config(name: str, arg=None) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# ----------------------------------------------------------------------------- MethodDef
def test_defaults_are_the_experiments():
  md = MethodDef.from_config("inherit", {"kind": "inhernet", "rank": 8})
  assert (md.heads, md.preset, md.init, md.svd, md.loss, md.allocation, md.objective) == (
      1, "default", "svd", "auto", "ce", "uniform", "param_energy")
  # One default for the greedy's objective: the experiment's is the library's.
  assert md.objective == inspect.signature(budget.allocate).parameters["objective"].default
  assert (md.data_aware, md.calibration_batches, md.sweep, md.init_key) == (False, 8, True, None)
  assert md.recalibrate is experiment.RECALIBRATE is True
  assert md.recalibration_batches == experiment.RECALIBRATION_BATCHES == 32
  assert md.label_or("inherit") == "inherit" and md.loss_kwargs == {} and md.kwargs == {}
  assert MethodDef.default("heads") == 1
  with pytest.raises(KeyError, match="kind"):
    MethodDef.default("kind")


def test_fields_are_validates_by_kind():
  fields = validate.METHOD_FIELDS
  assert sorted(MethodDef.fields()) == sorted(fields["common"] + fields["student"]
                                              + fields["inhernet"])


def test_unknown_field_names_its_path_and_the_known_ones():
  with pytest.raises(ValueError, match=r"config\.method_defs\.inherit\.rnak: unknown field; "
                                       r"known: \[.*'rank'"):
    MethodDef.from_config("inherit", {"kind": "inhernet", "rank": 4, "rnak": 8})


@pytest.mark.parametrize("md, match", [
    ({"kind": "distill"}, r"method_defs\.m\.kind must be one of \('student', 'inhernet'\), "
                          r"got 'distill'"),
    ({}, r"method_defs\.m\.kind must be one of .* got None"),
    ({"kind": "student"}, r"method_defs\.m\.model: a student needs a model name"),
    ({"kind": "inhernet", "rank": 4, "init": "zeros"},
     r"method_defs\.m\.init must be 'svd' or 'random', got 'zeros'"),
    ({"kind": "inhernet"}, r"method_defs\.m\.rank: InherNet needs a rank"),
])
def test_bad_definitions_name_the_field(md, match):
  with pytest.raises(ValueError, match=match):
    MethodDef.from_config("m", md)


def test_as_dict_is_the_definition_as_written_for_every_config():
  # The checkpoint fingerprint holds `as_dict`: it must be the config's dict, unchanged.
  for path in sorted((ROOT / "configs").glob("*.py")):
    if path.stem in ("__init__", "common"):
      continue
    config = _config(path.stem)
    for name, node in (config.get("method_defs") or {}).items():  # (minilm.py: none)
      md = MethodDef.from_config(name, node)
      assert md.as_dict() == node.to_dict(), (path.stem, name)
      assert list(md.as_dict()) == list(node.to_dict()), (path.stem, name)


def test_replace_counts_the_changed_fields_as_given():
  md = MethodDef.from_config("inherit", {"kind": "inhernet", "rank": "8", "label": "I"})
  swept = md.replace(rank=8, heads=2)
  assert swept.as_dict() == {"kind": "inhernet", "rank": 8, "label": "I", "heads": 2}
  assert swept.as_dict(exclude=("label",)) == {"kind": "inhernet", "rank": 8, "heads": 2}
  assert md.heads == 1 and md["rank"] == "8"  # The original is unchanged.
  with pytest.raises(dataclasses.FrozenInstanceError):
    md.heads = 3


def test_expand_methods_keeps_the_dict_form():
  config = _config("digits", "sweep")
  typed = experiment.method_defs(config)
  plain = experiment.expand_methods(config)
  assert [k for k, _ in typed] == [k for k, _ in plain]
  for (_, md), (_, d) in zip(typed, plain):
    assert md.as_dict() == d
  assert dict(plain)["inherit_r16_h2"] == {
      **config.method_defs.inherit.to_dict(), "rank": 16, "heads": 2,
      "label": "InherNet r=16 H=2"}


# ----------------------------------------------------------------------------- RunRecord
def test_real_record_round_trips():
  record = RunRecord.from_json(REAL)
  assert record.to_json() == REAL
  assert list(record.to_json()) == list(REAL)  # results.json's key order.
  assert record.extra == {}
  assert record.final_metric == record["final_metric"] == REAL["final_metric"]
  assert json.dumps(record.to_json()) == json.dumps(REAL)


def test_unknown_keys_are_kept_in_extra():
  newer = {**REAL, "energy_kept": 0.93}
  record = RunRecord.from_json(newer)
  assert record.extra == {"energy_kept": 0.93}
  assert record["energy_kept"] == 0.93 and record.to_json() == newer


def test_an_older_record_loads_with_defaults():
  old = {k: v for k, v in REAL.items() if k not in ("gates", "calibration_batches", "init")}
  record = RunRecord.from_json(old)
  assert record.gates is None and record.calibration_batches is None and record.init is None
  assert RunRecord.from_json({"method": "m"}).label == "m"
  with pytest.raises(ValueError, match="needs a 'method'"):
    RunRecord.from_json({"seed": 0})


def test_record_is_frozen():
  record = RunRecord.from_json(REAL)
  with pytest.raises(TypeError, match="dataclasses.replace"):
    record["final_metric"] = 1.0
  assert dataclasses.replace(record, epochs_to_scratch=None)["epochs_to_scratch"] is None
  with pytest.raises(ValueError, match="repeats record fields"):
    RunRecord(method="m", extra={"seed": 1})


def test_report_reads_records_and_dicts_alike(tmp_path):
  runs = [dict(REAL, seed=s, final_metric=0.3 + 0.01 * s) for s in range(3)]
  typed = [RunRecord.from_json(r) for r in runs]
  assert report.summarize(typed) == report.summarize(runs)
  rows = report.summarize(runs)
  assert report.markdown_table(rows, "accuracy", True) == report.markdown_table(
      report.summarize(typed), "accuracy", True)
  report.write_report(runs, str(tmp_path / "dicts"), title="t")
  report.write_report(typed, str(tmp_path / "typed"), title="t")
  for name in ("results.json", "results.md"):
    assert (tmp_path / "dicts" / name).read_text() == (tmp_path / "typed" / name).read_text()


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(st.dictionaries(st.text(min_size=1), _json_scalars, max_size=6), st.data())
def test_any_json_record_round_trips(extra, data):
  run = {k: data.draw(_json_scalars) for k in RunRecord.keys_of_fields()
         if data.draw(st.booleans())}
  run.update({k: v for k, v in extra.items() if k not in RunRecord.keys_of_fields()})
  run["method"] = "m"
  if run.get("label") is None:  # An absent (or null) label reads as the method's key.
    run["label"] = "m"
  record = RunRecord.from_json(run)
  assert {k: record[k] for k in run} == run
  assert RunRecord.from_json(record.to_json()) == record

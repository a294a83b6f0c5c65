"""The quick start's job, end to end on its small local variant."""

import importlib.util
import pathlib

from inhernet_jax import demo


def _config():
  path = pathlib.Path(__file__).parents[1] / "configs" / "inherit_digits.py"
  spec = importlib.util.spec_from_file_location("inherit_digits", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("local")


def test_demo_runs_and_inherited_networks_are_smaller_and_learn():
  config = _config()
  rows = demo.run(config)
  teacher, rest = rows[0], rows[1:]
  assert teacher["method"] == "teacher"
  assert teacher["acc"] > 0.5  # Ten classes: chance is 0.1.
  inherited = [r for r in rest if r["method"].startswith("InherNet")]
  assert len(inherited) == len(config.ranks) * len(config.heads)
  for row in inherited:
    assert row["params"] < teacher["params"]
    assert 0.0 < row["energy_kept"] <= 1.0
    assert row["acc"] > 0.3
  text = demo.format_rows(rows)
  assert all(r["method"] in text for r in rows)

"""`inhernet_jax.experiment.validate`: the whole experiment config checked before anything trains."""

import ml_collections
import pytest

from configs import chars, cifar100, digits, imagenet, vit
from inhernet_jax.experiment import runs as experiment
from inhernet_jax.experiment import preflight, validate


def _local():
  return digits.get_config("local")


@pytest.mark.parametrize("config", [
    digits.get_config(), digits.get_config("local"), digits.get_config("sweep"),
    digits.get_config("beyond"), chars.get_config(), chars.get_config("local"),
    cifar100.get_config(), imagenet.get_config(), vit.get_config()],
    ids=["digits", "digits_local", "digits_sweep", "digits_beyond", "chars", "chars_local",
         "cifar100", "imagenet", "vit"])
def test_shipped_configs_are_valid(config):
  validate.check_config(config)
  # Built on shapes too: every model, InherNet spec and hint layer (no false refusal).
  problems = validate._Problems()  # pylint: disable=protected-access
  preflight.check_models(problems, config)
  assert not problems, problems


@pytest.mark.parametrize("edit, match", [
    (lambda c: setattr(c, "epochs", -1), r"config\.epochs: expected an int >= 1, got -1"),
    (lambda c: setattr(c, "batch_size", 0), r"config\.batch_size: expected an int >= 1, got 0"),
    (lambda c: setattr(c, "keep_checkpoints", 0), r"keep_checkpoints.*0 would delete"),
    (lambda c: setattr(c.teacher, "epochs", 0), r"config\.teacher\.epochs"),
    (lambda c: setattr(c.teacher, "model", "resnet9000"), r"teacher\.model: unknown model"),
    (lambda c: setattr(c, "methods", "student,nope"), r"names \['nope'\]"),
    (lambda c: setattr(c.method_defs.inherit, "heads", 0), r"inherit\.heads: expected an int >= 1"),
    (lambda c: setattr(c.method_defs.inherit, "rank", "0"), r"inherit\.rank: a rank must be >= 1"),
    (lambda c: setattr(c.method_defs.inherit, "rank", "1.5"), r"inherit\.rank: a fractional rank"),
    (lambda c: setattr(c.method_defs.inherit, "rank", "params:teacher"),
     r"'teacher' is not a student method run before it"),
    (lambda c: setattr(c.method_defs.inherit, "rank", "student:resnet9000"),
     r"inherit\.rank 'student:resnet9000': unknown zoo model 'resnet9000'"),
    (lambda c: setattr(c.method_defs.inherit, "rank", "student:"),
     r"inherit\.rank: 'student:' needs a zoo model name"),
    (lambda c: setattr(c.method_defs.inherit, "rank", "teacher:mlp"), r"inherit\.rank: expected"),
    (lambda c: setattr(c.method_defs.inherit, "kind", "distill"), r"inherit\.kind"),
    (lambda c: setattr(c.method_defs.student, "loss", "mse"), r"student\.loss: unknown loss 'mse'"),
    (lambda c: c.method_defs.student_kd.loss_kwargs.update({"temperature": -1.0}),
     r"student_kd\.loss_kwargs"),
    (lambda c: setattr(c.method_defs.student, "model", "vgg99"), r"student\.model: unknown model"),
    (lambda c: c.method_defs.inherit.update({"rnak": 4}), r"inherit: unknown fields \['rnak'\]"),
    (lambda c: c.method_defs.inherit.update({"allocation": "best"}), r"inherit\.allocation"),
    (lambda c: c.optimizer.update({"learning_rate": -1.0}), r"config\.optimizer"),
    (lambda c: setattr(c.sweep, "heads", (1, 0)), r"sweep\.heads\[1\]"),
])
def test_every_bad_field_is_named(edit, match):
  config = _local()
  edit(config)
  with pytest.raises(validate.ConfigError, match=match):
    validate.check_config(config)


def test_a_sweep_replaces_the_methods_own_rank():
  config = _local()
  config.methods = "inherit"  # Its rank 'params:student' names no earlier student ...
  with pytest.raises(validate.ConfigError, match="not a student method run before it"):
    validate.check_config(config)
  config.sweep = ml_collections.ConfigDict({"ranks": (2, 4), "heads": (1, 2)})
  validate.check_config(config)  # ... but the sweep's ranks replace it.


def test_all_problems_in_one_error():
  config = _local()
  config.epochs, config.batch_size = -1, 0
  config.method_defs.inherit.heads = 0
  with pytest.raises(validate.ConfigError) as e:
    validate.check_config(config)
  assert all(f in str(e.value) for f in ("config.epochs", "config.batch_size", "inherit.heads"))


@pytest.mark.parametrize("text, value", [("8", 8), ("0.25", 0.25), ("1.0", 1.0), (8, 8),
                                         ("params:student", "params:student"),
                                         ("student:resnet8", "student:resnet8")])
def test_parse_rank(text, value):
  got = validate.parse_rank(text, "x")
  assert got == value and type(got) is type(value)


def test_command_line_string_ranks_reach_the_methods():
  """``--config.method_defs.inherit.rank=8`` sets the string '8' (the field is a string)."""
  config = _local()
  config.methods = "student,inherit,inherit_kd"
  config.method_defs.inherit.rank = "8"
  config.method_defs.inherit_kd.rank = "0.5"
  validate.check_config(config)
  ranks = {k: md.get("rank") for k, md in experiment.expand_methods(config)}
  assert ranks == {"student": None, "inherit": 8, "inherit_kd": 0.5}


def test_experiment_fails_before_anything_trains(tmp_path):
  config = _local()
  config.method_defs.inherit_random.heads = 0  # The last method: it would train last.
  with pytest.raises(validate.ConfigError, match="inherit_random.heads"):
    experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Not even the workdir.

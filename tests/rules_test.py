"""inhernet_jax.common.rules: the path-rule engine of InherSpec, sharding and weight decay."""

import warnings

import pytest

from inhernet_jax.training import optim
from inhernet_jax.common import rules
from inhernet_jax.parallel import sharding
from inhernet_jax.decomposition.spec import InherSpec

RULES = rules.check_rules([(r".*head.*", "skip"), (r"conv\d/kernel", 8), (".*", 4)], "my rules")


def test_the_first_full_match_wins():
  assert rules.first_match(RULES, "head/kernel") == (0, "skip")
  assert rules.first_match(RULES, "conv1/kernel") == (1, 8)
  assert rules.first_match(RULES, "conv1/kernel/x") == (2, 4)  # conv\d/kernel: not a full match
  assert rules.first_match(RULES[:2], "fc/kernel") == (None, None)


def test_unmatched_rules_are_named_in_a_warning():
  assert rules.unmatched(RULES, ["conv1/kernel"]) == [0]
  with pytest.warns(UserWarning, match=r"my rules\[0\] \('\.\*head\.\*'\) matches no kernel"):
    rules.warn_unmatched(RULES, ["conv1/kernel"], "my rules", "kernel")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    rules.warn_unmatched(RULES, ["head", "conv2/kernel"], "my rules")


@pytest.mark.parametrize("bad,error,match", [
    ("x", TypeError, r"^my rules must be a sequence of \(regex, action\) pairs"),
    ({"x": 1}, TypeError, r"^my rules must be a sequence"),
    ([("x",)], TypeError, r"^my rules\[0\] must be a \(regex, action\) pair"),
    (["ab"], TypeError, r"^my rules\[0\] must be a \(regex, action\) pair"),
    ([(".*", 1), ("(", 1)], ValueError, r"^my rules\[1\]: invalid regex '\('"),
])
def test_one_error_format(bad, error, match):
  with pytest.raises(error, match=match):
    rules.check_rules(bad, "my rules")


def test_the_action_check_gets_the_rule_named():
  def positive(action, where):
    if action <= 0:
      raise ValueError(f"{where}: must be > 0")
    return action

  with pytest.raises(ValueError, match=r"^my rules\[1\] \('b'\): must be > 0$"):
    rules.check_rules([("a", 1), ("b", 0)], "my rules", positive)


def test_the_three_users_share_the_format():
  with pytest.raises(ValueError, match=r"^InherSpec.rules\[0\]: invalid regex"):
    InherSpec(rank=2, rules=(("(", "skip"),))
  with pytest.raises(ValueError, match=r"^sharding rules\[0\]: invalid regex"):
    sharding.resolve_rules([("(", "fsdp")])
  with pytest.raises(ValueError, match=r"^optimizer config: weight_decay_mask: invalid regex"):
    optim.decay_mask({}, "(")

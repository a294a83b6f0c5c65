r"""How far `budget.allocate`'s greedy is from the optimum, on random small problems.

  python -m benchmarks.budget --problems=1500 --seed=0

The generator (`random_problem`, also the tests'): 2 to 6 dense layers of random shapes (4..19),
flat, exponentially or polynomially decaying spectra, 1 to 3 heads, a random feasible
budget; the three objectives in turn. For each problem: the greedy's and the exact
dynamic program's objective, the gap divided by the number of layers (normalised energy
per layer). Prints the share of problems where the greedy is below the optimum, the
share with a gap above 0.02 per layer, the worst gap and the greedy's time.
"""

import time

import numpy as np
from absl import app, flags

from inhernet_jax.decomposition import accounting
from inhernet_jax.decomposition import budget
from inhernet_jax.decomposition.transform import planned_param_count
from inhernet_jax.decomposition.spec import InherSpec

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: `random_problem` is
  imported by tests beside launchers with a ``--seed`` of their own)."""
  flags.DEFINE_integer("problems", 1500, "Random problems.")
  flags.DEFINE_integer("seed", 0, "Generator seed.")


def random_problem(rng, layers: int, size: int = 20):
  """``(params, spectra)`` of ``layers`` random dense layers (shapes 4..``size``-1), each
  spectrum flat, exponentially or polynomially decaying (also tests/budget_test.py's)."""
  shapes = [tuple(int(d) for d in rng.integers(4, size, 2)) for _ in range(layers)]
  params = {f"l{i}": {"kernel": np.zeros(s, np.float32), "bias": np.zeros(s[1], np.float32)}
            for i, s in enumerate(shapes)}
  spectra = {}
  for i, (m, n) in enumerate(shapes):
    kind, k = rng.integers(3), min(m, n)
    spectra[f"l{i}/kernel"] = [np.ones(k), np.exp(-rng.uniform(0, 1) * np.arange(k)),
                               (1.0 + np.arange(k)) ** -rng.uniform(0.2, 2)][kind]
  return params, spectra


def random_budget(rng, params) -> tuple[int, int] | None:
  """``(heads, target)``: 1 to 3 heads and a parameter target between the rank-1 network's
  count and the teacher's (None when even rank 1 is larger than the teacher)."""
  heads = int(rng.integers(1, 4))
  total = accounting.param_count(params)
  floor = planned_param_count(params, InherSpec(rank=1, heads=heads))
  if floor > total:
    return None
  return heads, int(rng.integers(floor, total + 1))


def measure(problems: int, seed: int) -> dict:
  """Gaps per layer (exact - greedy) by objective, and the greedy's mean seconds."""
  rng = np.random.default_rng(seed)
  gaps = {o: [] for o in budget.OBJECTIVES}
  seconds, done = 0.0, 0
  while done < problems:
    params, spectra = random_problem(rng, int(rng.integers(2, 7)))
    drawn = random_budget(rng, params)
    if drawn is None:
      continue
    heads, target = drawn
    objective = budget.OBJECTIVES[done % len(budget.OBJECTIVES)]
    t0 = time.perf_counter()
    greedy = budget.allocate(params, target, heads=heads, spectra=spectra, objective=objective,
                             return_info=True)[1]
    seconds += time.perf_counter() - t0
    exact = budget.allocate(params, target, heads=heads, spectra=spectra, objective=objective,
                            method="exact", return_info=True)[1]
    assert greedy["params"] <= target
    gaps[objective].append((exact["objective"] - greedy["objective"]) / len(spectra))
    done += 1
  return {"gaps": {o: np.array(v) for o, v in gaps.items()}, "seconds": seconds / problems}


def main(argv):
  del argv
  result = measure(FLAGS.problems, FLAGS.seed)
  every = np.concatenate(list(result["gaps"].values()))
  print(f"{len(every)} problems: greedy below the optimum in {np.mean(every > 1e-9):.1%}, "
        f"by more than 0.02 energy per layer in {np.mean(every > 0.02):.2%}; worst "
        f"{every.max():.4f}, mean {every.mean():.5f}; greedy {result['seconds'] * 1e3:.1f} ms "
        "per problem")
  for objective, gaps in result["gaps"].items():
    print(f"  {objective}: {len(gaps)} problems, below {np.mean(gaps > 1e-9):.1%}, "
          f"> 0.02 {np.mean(gaps > 0.02):.2%}, worst {gaps.max():.4f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)

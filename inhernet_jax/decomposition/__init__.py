"""The method: from a teacher's params to the inherited network's params.

* `svd`: the maths on one batch of matrices (exact, randomized and whitened truncated
  SVDs, spectral energy, parameter counts);
* `spec`: `InherSpec`, what the user asks for (a rank policy, heads, path rules);
* `plan`: the one planning pass: every kernel's matrix view, rank, heads, method and
  start seeds, and the batches that the executors run;
* `host`, `sharded`: the executors (NumPy on the host; jitted and sharded over a mesh);
  they execute a plan and return factors, they decide nothing;
* `transform`: `inherit`, `resolve`, `inherit_report`, the pytree in and out;
* `accounting`, `budget`, `budget_solve`: parameter counts, FLOPs and per-layer ranks at
  a parameter budget.

May import: `inhernet_jax.common`, `inhernet_jax.parallel`.
"""

"""The method: from a teacher's params to the inherited network's params.

* `svd` (and `starts`, its random start matrices): the maths on one batch of matrices (exact, randomized and whitened truncated
  SVDs, spectral energy);
* `spec`: `InherSpec`, what the user asks for (a rank policy, heads, path rules);
* `policy`: the rank policy, the one place a kernel's keep-or-factorise, rank, heads
  and SVD method are decided (`layer_plan`, also read by the layers), and the exact
  parameter counts it is decided by;
* `plan`: the one planning pass: `build` makes the frozen `Plan` (every kernel's matrix
  view and `LayerPlan`, the batches with their methods and start seeds);
* `compute`, `host`, `sharded`: the executors (jitted; NumPy on the host; over a mesh);
  they read a plan and return factors, they decide nothing;
* `assemble`: factors to params and gates, and the new pytree;
* `transform`: `inherit`, `resolve`, `inherit_report`, the pytree in and out;
* `accounting`, `budget`, `budget_solve`: parameter counts, FLOPs and per-layer ranks at
  a parameter budget.

May import: `inhernet_jax.common`, `inhernet_jax.parallel`.
"""

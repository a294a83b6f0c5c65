"""`launch.inherit --model=pkg.module:Name --params=CKPT`: a model outside the zoo, from the
command line (subprocess): inherited, BatchNorm re-estimated, checkpointed and exported."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import inhernet_jax as ij
from inhernet_jax.interop import export

ROOT = pathlib.Path(__file__).resolve().parents[1]

MODEL_SOURCE = textwrap.dedent('''
    import flax.linen as nn

    class MyModel(nn.Module):
      width: int = 32

      @nn.compact
      def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        return nn.Dense(10)(x.mean((1, 2)))
''')


def test_a_user_model_is_inherited_recalibrated_and_exported(tmp_path):
  pkg = tmp_path / "src" / "my_pkg"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "my_module.py").write_text(MODEL_SOURCE)
  sys.path.insert(0, str(tmp_path / "src"))
  try:
    from my_pkg.my_module import MyModel
  finally:
    sys.path.pop(0)
  model = MyModel(width=32)
  x = jnp.zeros((1, 8, 8, 1))
  variables = model.init(jax.random.key(0), x)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "teacher", variables)
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path / 'src'}")
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.inherit", "--config=configs/digits.py:local",
       "--model=my_pkg.my_module:MyModel", '--model_kwargs={"width": 32}',
       f"--params={tmp_path / 'teacher'}", "--rank=4", "--heads=3", "--recalibration_batches=2",
       f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "output layer" in (out / "report.md").read_text()
  assert "re-estimated" in proc.stdout
  # The export rebuilds the student around the user's model; same tree, same outputs as
  # inheriting in-process (BatchNorm statistics aside: re-estimated on the data).
  weights, _ = export.load(out / "export")
  sys.path.insert(0, str(ROOT))
  from launch.user_model import student_from_export
  student = student_from_export(model, out / "export")
  expected, new_vars = ij.inherit_model(model, variables, ij.InherSpec(rank=4, heads=3), x,
                                        apply_kwargs={"train": False})
  assert student.planned == expected.planned and [p.path for p in student.planned] == [("Conv_1",)]
  shapes = lambda t: jax.tree.map(np.shape, t)  # noqa: E731
  assert shapes(weights["params"]) == shapes(dict(new_vars["params"]))
  np.testing.assert_allclose(weights["params"]["Conv_1"]["down"]["kernel"],
                             new_vars["params"]["Conv_1"]["down"]["kernel"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(weights["batch_stats"]["BatchNorm_0"]["mean"],
                         variables["batch_stats"]["BatchNorm_0"]["mean"])
  y = student.apply(weights, jnp.ones((2, 8, 8, 1)))
  assert y.shape == (2, 10) and bool(jnp.isfinite(y).all())

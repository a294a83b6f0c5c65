"""docs/your-model.md's Python blocks run, in order, in one namespace (what CI promises)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_your_model_page_runs():
  text = (ROOT / "docs" / "your-model.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert len(blocks) >= 6
  namespace = {"__name__": "your_model_doc"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"docs/your-model.md block {i}", "exec"), namespace)  # noqa: S102
  assert float(namespace["loss"]) > 0

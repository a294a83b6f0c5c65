"""Quick start: inherit a digits CNN teacher and fine-tune it (see configs/inherit_digits.py).

  python -m launch.demo --config=configs/inherit_digits.py [--out=results.json]
"""

import json

from absl import app, flags
from ml_collections import config_flags

from inhernet_jax import demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/inherit_digits.py")
_OUT = flags.DEFINE_string("out", None, "Optional JSON file for the result rows.")


def main(argv):
  del argv
  rows = demo.run(_CONFIG.value)
  print(demo.format_rows(rows))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  app.run(main)

#!/usr/bin/env bash
# Quick start: set up .venv from requirements.txt (once), then inherit a digits teacher.
#   bash launch/quickstart.sh                 # the default config
#   bash launch/quickstart.sh --config=configs/inherit_digits.py:local
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m launch.demo --config=configs/inherit_digits.py "$@"

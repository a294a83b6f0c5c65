#!/usr/bin/env bash
# Quick start: set up .venv from requirements.txt (once), then run the digits experiment
# (teacher -> students from scratch / KD / DKD / FitNet -> InherNet, 3 seeds) and print
# its table. Re-running resumes (or reuses) the checkpoints in workdir/digits.
#   bash launch/quickstart.sh
#   bash launch/quickstart.sh --config=configs/digits.py:local --workdir=/tmp/quick
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m launch.main --config=configs/digits.py --workdir=workdir/digits "$@"

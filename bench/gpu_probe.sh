#!/usr/bin/env bash
# The one-window GPU proof: python -m bench.probe (its docstring lists the stages and budgets).
# From the repository root on the GPU machine, as one device-tool command of at most 9 minutes:
#   bash bench/gpu_probe.sh                 # results in $OUT when set, else bench/results/probe_<time>_<device>/
#   bash bench/gpu_probe.sh --skip build,tests   # a quicker rerun on a machine already built
# fla-core (the lightning peer) and other wheels travel in the git-ignored .wheels/ (carry=[".wheels"]);
# the probe installs them offline. Fetch them here first, e.g.:
#   pip download fla-core --no-deps --only-binary=:all: --python-version 3.12 -d .wheels
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m bench.probe "$@"

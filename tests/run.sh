#!/usr/bin/env bash
# The test suite on a fresh machine: a virtual environment in .venv with the CPU build of torch and
# megassm[dev], then pytest (arguments are passed on, e.g. `bash tests/run.sh -k ssd`).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q "${MEGASSM_TORCH:-torch==2.13.0}"
pip install -q -e ".[dev]"
exec python -m pytest "$@"

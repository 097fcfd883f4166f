#!/usr/bin/env bash
# The test suite on a fresh machine: .venv with the CPU build of torch and megassm[dev] (launch/setup.sh),
# then pytest in two processes (pytest-xdist; arguments are passed on, e.g. `bash tests/run.sh -k ssd`, `-n 0` for one).
# Two: most tests start processes of their own, which keep a CPU busy only part of the time.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh dev
exec python -m pytest -n 2 "$@"

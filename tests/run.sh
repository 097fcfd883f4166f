#!/usr/bin/env bash
# The test suite on a fresh machine: .venv with the CPU build of torch and megassm[dev] (launch/setup.sh),
# then pytest (arguments are passed on, e.g. `bash tests/run.sh -k ssd`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh dev
exec python -m pytest "$@"

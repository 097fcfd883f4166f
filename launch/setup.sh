#!/usr/bin/env bash
# Sourced by launch/quickstart.sh and tests/run.sh: a virtual environment in .venv with torch (the
# CPU build unless one is installed; MEGASSM_TORCH picks another) and megassm with the given extras.
# Usage: source launch/setup.sh EXTRAS   (e.g. dev, or "" for none: always give it, as a script sourced
# without arguments sees its caller's)
# A .venv without a working pip (python3 -m venv failed or was interrupted) would install into another interpreter.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv
  python3 -m venv .venv
fi
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "${MEGASSM_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".${1:+[$1]}"

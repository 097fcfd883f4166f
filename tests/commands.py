"""The project's command-line tools as a user runs them (a subprocess) or as tests call them (the module)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRESS_BAR = re.compile(r"(.*\r)?[^\r]*\[[^\]]*/s\]")  # tqdm's bar as it was left: "desc: ... [00:01, 12.3 examples/s]"


def run_tool(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """python tools/<script> args in cwd, datasets' cache under cwd; the output captured as text."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


def load_tool(script: str) -> ModuleType:
    """tools/<script> imported as a module, so that a test can call its functions."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / "tools" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr but the progress bars a tool draws while it works."""
    return [line for line in stderr.splitlines() if line.strip() and not PROGRESS_BAR.fullmatch(line)]


def user_error(capsys, main: Callable[[list[str]], object], args: list[str]) -> str:
    """A tool's main(args) stopped on a user's mistake: exit status 2 and one line on stderr, returned."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, (exited.value.code, err)
    return err.rstrip("\n")


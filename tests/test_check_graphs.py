"""tools/check_graphs.py on CPU processes (gloo), where both of its models run eagerly: its layouts (DDP engine, TP, CP),
batches and verdicts work, so that a GPU call runs the check itself."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_check_graphs_runs_its_layouts():
    command = [sys.executable, str(ROOT / "tools" / "check_graphs.py"), "--preset", "debug", "--pattern", "M-", "--ngroups", "4",
               "--seq-len", "64", "--batches", "2", "--layouts", "dp2", "tp2xcp2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| dp2 ", "| tp2xcp2 "))]
    assert len(rows) == 2 and all(row.endswith("| PASS |") and "| 0.0e+00 |" in row for row in rows), done.stdout

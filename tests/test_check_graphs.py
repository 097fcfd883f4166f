"""tools/check_graphs.py on CPU processes (gloo), where both of its models run eagerly: its layouts (DDP engine, TP, CP),
batches and verdicts work, so that a GPU call runs the check itself."""

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.bench import torchrun_env_for_one_process
from tools.check_trainer_graphs import DEEPSPEED_SCENARIOS, SCENARIOS

ROOT = Path(__file__).resolve().parents[1]


def check_graphs(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "tools" / "check_graphs.py"), "--preset", "debug", "--pattern", "M-", "--ngroups", "4",
               "--seq-len", "64", "--batches", "2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_check_graphs_runs_its_layouts():
    done = check_graphs("--layouts", "dp2", "tp2xcp2", "--micro-batches", "2")  # gradients summed over micro batches
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| dp2 ", "| tp2xcp2 "))]
    assert len(rows) == 2 and all(row.endswith("| PASS |") and "| 0.0e+00 |" in row for row in rows), done.stdout
    # Each layout's eager model against one process on the whole batch (tp2 x cp2: against this rank's piece of each
    # gradient): the loss and largest gradient difference, both fp32 here
    for row in rows:
        one_loss, one_grad = (float(cell.split()[0]) for cell in row.split(" | ")[4].split("; "))
        assert one_loss < 1e-6 and one_grad < 1e-5, row


def test_check_graphs_runs_the_deepspeed_engine():
    """ZeRO's gradients (tp2 + SP: the replicated parameters' summed over TP by its hook) against one process."""
    done = check_graphs("--engine", "deepspeed", "--layouts", "tp2+sp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| tp2+sp "))
    one_loss, one_grad = (float(cell.split()[0]) for cell in row.split(" | ")[4].split("; "))
    assert row.endswith("| PASS |") and one_loss < 1e-6 and one_grad < 1e-4, row


def test_one_process_gets_what_it_lacks_of_torchruns_environment(monkeypatch):
    """DeepSpeed's rows and checks run as one process of torchrun's: what is set stays, a free port where none is."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = torchrun_env_for_one_process()
    assert {k: v for k, v in env.items() if k != "MASTER_PORT"} == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                                                      "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    with socket.socket() as taken:  # the port offered is free: it can be bound
        taken.bind(("127.0.0.1", int(env["MASTER_PORT"])))
    monkeypatch.setenv("MASTER_PORT", "29533")
    monkeypatch.setenv("RANK", "3")
    assert "MASTER_PORT" not in torchrun_env_for_one_process() and "RANK" not in torchrun_env_for_one_process()


def test_check_graphs_fails_past_its_tolerance():
    done = check_graphs("--layouts", "tp2", "--tolerance", "-1")  # no difference passes a negative tolerance
    assert done.returncode == 1 and any(line.startswith("| tp2 ") and line.endswith("| FAIL |") for line in done.stdout.splitlines())


def test_check_graphs_refuses_a_layout_it_cannot_run_before_starting_any():
    done = check_graphs("--layouts", "cp2", "cp2xtp2")
    assert done.returncode == 2 and "'cp2xtp2' is not a layout: sizes in the order tp, cp, dp" in done.stderr, done.stderr
    done = check_graphs("--backend", "nccl", "--layouts", "tp2xcp2")
    assert done.returncode == 2 and "layout tp2xcp2 needs 4, this machine has 0" in done.stderr, done.stderr


def test_a_nan_or_an_infinity_is_never_within_a_tolerance():
    """max() drops a NaN (max(0.0, nan) is 0.0): a graphed model whose loss or gradients were NaN passed check_graphs,
    and a fast path with NaN losses bench --check."""
    from tools import bench, bench_ssd

    nan, inf = math.nan, math.inf
    assert bench_ssd.relative_error(torch.tensor([1.0, nan]), torch.tensor([1.0, 2.0])) == inf
    assert bench_ssd.relative_error(torch.tensor([inf]), torch.tensor([1.0])) == inf
    assert bench_ssd.relative_error(torch.tensor([1.5, 2.0]), torch.tensor([1.0, 2.0])) == 0.25
    assert bench.relative_difference(nan, 1.0) == inf and bench.relative_difference(1.0, nan) == inf
    assert bench.relative_difference(1.5, 2.0) == 0.25


@pytest.mark.parametrize("engine, scenarios", [("ddp", SCENARIOS), ("deepspeed", DEEPSPEED_SCENARIOS)])
def test_check_trainer_graphs_runs_its_scenarios(prepared_data, engine, scenarios):
    """On CPU both runs are eager and deterministic: every scenario must agree exactly (a mismatch means the tool's own
    runs differ, e.g. a resume that does not go on where the first run was)."""
    command = [sys.executable, str(ROOT / "tools" / "check_trainer_graphs.py"), "--data", str(prepared_data), "--engine", engine]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]  # below the header
    assert len(rows) == len(scenarios) and all(row.endswith("| PASS |") for row in rows), done.stdout
    assert f"PASS: {len(scenarios)} of {len(scenarios)} scenarios within 1e-04 (CPU: both runs eager)" in done.stdout
    assert all(", ".join(["0.0e+00"] * 4) in row for row in rows), done.stdout

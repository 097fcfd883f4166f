"""The trainer through its real entry point: torchrun with several CPU processes (gloo) against one
process, in fp32 on the same data. Losses and gradient norms of every step must agree."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 4
CONFIG = """
[model]
preset = "debug"
chunk_size = 16
[data]
path = "{data}"
seq_len = 88          # 5.5 chunks: CP slices of 44 and 22 tokens, documents crossing them
micro_batch = 2
global_batch = 8
[optim]
lr = 3e-3
warmup_steps = 2
[train]
steps = {steps}
precision = "fp32"
log_every = 1
eval_every = 2
eval_samples = 8
[checkpoint]
every = 2
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config: Path, run_dir: Path, nproc: int, *overrides: str) -> list[dict]:
    """Run the trainer (under torchrun when nproc > 1) and return its metrics.jsonl records."""
    args = ["--config", str(config), f"--run.dir={run_dir}", *overrides]
    if nproc == 1:
        command = [sys.executable, "-m", "megassm.train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "megassm.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_step(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


def assert_same_run(got: list[dict], want: list[dict], rel: float = 1e-5) -> None:
    for key in ("loss", "grad_norm", "val_loss"):
        g, w = by_step(got, key), by_step(want, key)
        assert g.keys() == w.keys(), (key, g, w)
        for step in w:
            assert g[step] == pytest.approx(w[step], rel=rel), f"{key} at step {step}: {g[step]} vs {w[step]}"


@pytest.fixture(scope="module")
def config(prepared_data: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(CONFIG.format(data=prepared_data, steps=STEPS))
    return path


@pytest.fixture(scope="module")
def one_process(config: Path, tmp_path_factory) -> list[dict]:
    return train(config, tmp_path_factory.mktemp("one") / "run", 1)


def test_one_process_run_learns_and_writes_its_outputs(one_process, config):
    losses = by_step(one_process, "loss")
    assert list(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.1  # lr 3e-3 on a 512-token vocabulary: the loss falls at once
    for record in one_process:
        if "loss" in record:
            assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib"} <= record.keys()


LAYOUTS = {
    "tp2-cp2": ["--parallel.tp=2", "--parallel.cp=2"],
    "dp2-cp2": ["--parallel.cp=2"],
    "dp2-tp2-sequence-parallel": ["--parallel.tp=2", "--parallel.sequence_parallel=true"],
    "dp2-tp2-deepspeed-zero2": ["--parallel.tp=2", "--parallel.engine=deepspeed", "--parallel.zero_stage=2"],
    "dp2-cp2-deepspeed-zero1": ["--parallel.cp=2", "--parallel.engine=deepspeed", "--parallel.zero_stage=1"],
    "tp2-cp2-activation-checkpointing": ["--parallel.tp=2", "--parallel.cp=2", "--train.activation_checkpointing=true"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torchrun_layout_matches_one_process(layout, config, one_process, tmp_path):
    assert_same_run(train(config, tmp_path / "run", 4, *LAYOUTS[layout]), one_process)


def lose_the_last_checkpoint(run_dir: Path) -> None:
    """As if the run crashed while writing its step-4 checkpoint: only step 2 is complete."""
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS}")
    (run_dir / "checkpoints" / f".step_{STEPS}.tmp").mkdir()  # a half-written checkpoint is ignored
    (run_dir / "metrics.jsonl").unlink()


def test_resume_after_a_crash_continues_exactly_even_on_another_layout(config, one_process, tmp_path):
    """A run whose last complete checkpoint is step 2 resumes there under another layout and produces
    the uninterrupted run's steps 3 and 4."""
    run_dir = tmp_path / "run"
    train(config, run_dir, 4, *LAYOUTS["tp2-cp2"])
    lose_the_last_checkpoint(run_dir)
    resumed = train(config, run_dir, 2, "--parallel.cp=2")
    assert min(r["step"] for r in resumed) == 3
    assert_same_run(resumed, [r for r in one_process if r["step"] > 2])


@pytest.mark.parametrize("first, then", [(("dp2-tp2-deepspeed-zero2", 4), ("ddp", 1)), (("ddp", 1), ("dp4-deepspeed-zero1", 4))],
                         ids=["zero2-to-ddp", "ddp-to-zero1"])
def test_checkpoints_move_between_engines(first, then, config, one_process, tmp_path):
    """Both engines write the same logical checkpoint, optimizer state included."""
    layouts = {**LAYOUTS, "ddp": [], "dp4-deepspeed-zero1": ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"]}
    run_dir = tmp_path / "run"
    train(config, run_dir, first[1], *layouts[first[0]])
    lose_the_last_checkpoint(run_dir)
    assert_same_run(train(config, run_dir, then[1], *layouts[then[0]]), [r for r in one_process if r["step"] > 2])


def test_bf16_autocast_stays_close_to_fp32(config, one_process, tmp_path):
    assert_same_run(train(config, tmp_path / "run", 1, "--train.precision=bf16", "--train.eval_every=0"),
                    [{k: v for k, v in r.items() if k != "val_loss"} for r in one_process], rel=2e-2)


def test_diverging_run_skips_steps_then_stops_with_advice(config, tmp_path):
    """lr = 1e30 makes the weights overflow after the first update: later steps are non-finite, skipped,
    and after train.max_skipped_steps of them in a row the run stops with exit code 1 and one line."""
    command = [sys.executable, "-m", "megassm.train", "--config", str(config), f"--run.dir={tmp_path}", "--optim.lr=1e30",
               "--optim.min_lr=0", "--optim.warmup_steps=0", "--train.max_skipped_steps=2", "--train.steps=6", "--train.eval_every=0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "2 consecutive steps had a non-finite loss or gradient (the last: step 3)" in result.stderr.splitlines()[-1]
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in steps] == [0, 1]

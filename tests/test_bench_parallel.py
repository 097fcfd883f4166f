"""tools/bench_parallel.py, the multi-GPU measurements, on two CPU processes (gloo): its runs work
and its verdicts hold, so that a machine with GPUs needs one call."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def bench_parallel(prepared_data: Path, *args: str) -> str:
    command = [sys.executable, str(ROOT / "tools" / "bench_parallel.py"), "--preset", "debug", "--gpus", "2",
               "--data", str(prepared_data), *args]  # args last: they may override --gpus
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_collectives_per_layer(prepared_data):
    out = bench_parallel(prepared_data, "collectives", "--lengths", "64", "512")
    assert "| 64 | forward | all_reduce |" in out and "| 64 | backward | all_reduce |" in out  # TP: one each way
    assert "| 64 | forward | all_gather, reduce_scatter |" in out  # TP + SP
    cp_rows = [line for line in out.split("cp2, collectives")[1].splitlines() if line.startswith("| 64 ") or line.startswith("| 512 ")]
    assert len(cp_rows) == 4, out  # forward and backward at each length
    assert [row.split("|")[2:] for row in cp_rows[:2]] == [row.split("|")[2:] for row in cp_rows[2:]]  # same bytes at 8x the tokens


def test_checkpoint_resumed_under_another_layout(prepared_data):
    out = bench_parallel(prepared_data, "reshard", "--seq-len", "64", "--steps", "4")
    assert "written by tp2 at step 2, resumed by cp2: steps 3-4" in out and "PASS" in out


def test_one_rank_scaling(prepared_data):
    """--one-rank: rank 0 of tp2 + SP and cp2 alone (fake process group), each a finished trainer run."""
    out = bench_parallel(prepared_data, "scaling", "--one-rank", "--seq-len", "64", "--tokens-per-gpu", "64",
                         "--max-seq-len", "256", "--steps", "2", "--micro-batch", "1", "--global-batch", "4")
    tp_rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in out.splitlines() if line.startswith("| tp")}
    cp_rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in out.splitlines() if line.startswith("| cp")}
    rows = tp_rows | cp_rows  # layout: tokens/s per GPU
    assert rows.keys() == {"tp1 x dp2", "tp2 x dp1 + SP", "cp1", "cp2"}, out
    assert all(float(speed.replace(",", "")) > 0 for speed in rows.values()), out  # tokens/s, not an error line
    assert "longest single sequence trained on 2 GPUs: 256 tokens (the search stops at --max-seq-len)" in out


def test_profile_of_one_cp_rank(prepared_data):
    out = bench_parallel(prepared_data, "profile", "--cp", "2", "--seq-len", "128", "--layers", "2")
    assert "tp1 x cp2, 2 layers of debug, 128 tokens on this rank:" in out and "aten::mm" in out, out


def test_one_rank_collectives_write_their_outputs(monkeypatch):
    """On CUDA the fake process group leaves a gathered tensor as allocated; NaN there would make
    every --one-rank step of tp + SP non-finite, and the trainer skips the update of such a step."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    from bench_parallel import zeroing_output

    out = torch.full((4,), float("nan"))
    zeroing_output(lambda out, x, group=None: None)(out, torch.ones(2), group=None)
    assert out.eq(0).all()


def test_ranks_keep_the_callers_python_path(tmp_path, monkeypatch):
    """A mamba-ssm installed with `pip --target` reaches the ranks only through PYTHONPATH: a tool
    that replaced it would leave every GPU rank silently running the PyTorch SSD."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import bench_parallel

    script = tmp_path / "show_path.py"
    script.write_text("import sys\nprint('PATH', sys.path)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    done = bench_parallel.torchrun(1, [str(script)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = next(line for line in done.stdout.splitlines() if line.startswith("PATH"))
    assert str(tmp_path / "site") in shown and str(ROOT) in shown

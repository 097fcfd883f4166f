"""The trainer through its real entry point: torchrun with several CPU processes (gloo) against one
process, in fp32 on the same data. Losses and gradient norms of every step must agree."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import torch

from megassm.data import SampleLoader, TokenStream
from megassm.metrics import read_metrics
from megassm.model import Mamba2LM, ModelConfig
from megassm.pretrained import save_transformers
from tests.distributed import RDZV_ENDPOINT, reserved_port, run_distributed

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


TRAINER_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def trainer_command(config: Path, run_dir: Path, nproc: int, *overrides: str) -> list[str]:
    """The trainer's command line, under torchrun when nproc > 1 (megassm.torchrun, as launch/torchrun.sh runs it)."""
    args = ["--config", str(config), f"--run.dir={run_dir}", *overrides]
    if nproc == 1:
        return [sys.executable, "-m", "megassm.train", *args]
    return [sys.executable, "-m", "megassm.torchrun", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", RDZV_ENDPOINT, "-m", "megassm.train", *args]


def run_trainer(config: Path, run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_command(config, run_dir, nproc, *overrides), capture_output=True, text=True, env=TRAINER_ENV, timeout=600)


def train(config: Path, run_dir: Path, nproc: int, *overrides: str) -> list[dict]:
    """Run the trainer (under torchrun when nproc > 1) and return its metrics.jsonl records."""
    result = run_trainer(config, run_dir, nproc, *overrides)
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


def test_a_run_says_when_it_has_read_every_sample(config, prepared_data, tmp_path):
    windows = SampleLoader(TokenStream(prepared_data), seq_len=1024, seed=0).num_windows
    steps = windows // 8 + 1  # up to the step that reads the last unread sample, ceil(windows / 8), or one past it
    result = run_trainer(config, tmp_path / "run", 1, "--data.seq_len=1024", f"--train.steps={steps}", "--train.eval_every=0",
                         "--checkpoint.every=-1")
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_lines = [line for line in result.stdout.splitlines() if "has been read" in line]
    assert epoch_lines == [f"step {-(-windows // 8)}: every one of the training split's {windows:,} samples has been read 1 time(s); the "
                           "run reads them again, in another order"], result.stdout
    last = result.stdout.splitlines()[-1]  # checkpoint.every = -1: none written, none named
    assert last.startswith(f"done: steps 1-{steps} in ") and last.endswith(f"s; metrics in {tmp_path / 'run' / 'metrics.jsonl'}"), last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_one_process_run_learns_and_writes_its_outputs(one_process, config):
    losses = by_step(one_process, "loss")
    assert list(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.1  # lr 3e-3 on a 512-token vocabulary: the loss falls at once
    for record in one_process:
        if "loss" in record:
            assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib"} <= record.keys()


def test_checkpoint_every_minus_one_writes_none(config, tmp_path):
    records = train(config, tmp_path / "run", 1, "--checkpoint.every=-1", "--train.steps=2", "--train.eval_every=0")
    assert by_step(records, "loss").keys() == {1, 2} and not (tmp_path / "run" / "checkpoints").exists()


def test_the_first_blocks_recomputed_give_the_same_run(config, one_process, tmp_path, monkeypatch):
    """train.activation_checkpointing = 1: the trainer's model recomputes its first block, the start-up line says so,
    and the run is the one without recomputation."""
    from megassm.config import load_config
    from megassm.train import Trainer

    monkeypatch.setattr("megassm.train.limit_cpu_threads", lambda device: None)  # this test process's threads stay as they are
    cfg = load_config(config, [f"--run.dir={tmp_path / 'built'}", "--train.activation_checkpointing=1"])
    assert [layer.recompute for layer in Trainer(cfg).model.layers] == [True, False]
    result = run_trainer(config, tmp_path / "run", 1, "--train.activation_checkpointing=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| activation checkpointing of block 1 of 2 |" in result.stdout
    assert_same_run([json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()], one_process)


def _check_smallest_over_ranks() -> None:
    from megassm import host_memory
    from megassm.train import host_memory_share, smallest_over_ranks

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    assert smallest_over_ranks([80, 140, 24][rank], torch.device("cpu")) == 24
    host_memory.available = lambda: [None, 2**40, 3 * 2**30][rank]
    os.environ["LOCAL_WORLD_SIZE"] = "3"
    assert host_memory_share(torch.device("cpu")) == 2**30  # the third node's memory over its 3 processes
    host_memory.available = lambda: None
    assert host_memory_share(torch.device("cpu")) is None


def test_every_rank_decides_from_the_smallest_gpu_and_host_memory_of_the_job():
    """Each rank's memory choices take the job's smallest GPU: a block recomputed on one rank and not on another would
    repeat its collectives on one of them only; and the host memory left on the fullest node, so that all stop alike."""
    run_distributed(_check_smallest_over_ranks, 3)


TP2_CP2 = ["--parallel.tp=2", "--parallel.cp=2"]
# Four processes each; tp2 x cp2 with sequence parallelism and activation checkpointing is the run below that
# crashes, DeepSpeed's layouts run where checkpoints move between engines.
LAYOUTS = {
    "dp2-cp2": ["--parallel.cp=2"],
    "dp2-tp2-sequence-parallel": ["--parallel.tp=2", "--parallel.sequence_parallel=true"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torchrun_layout_matches_one_process(layout, config, one_process, tmp_path):
    assert_same_run(train(config, tmp_path / "run", 4, *LAYOUTS[layout]), one_process)


@pytest.fixture(scope="module")
def tp2_cp2_run(config, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A tp=2 x cp=2 run with sequence parallelism and activation checkpointing under torchrun: its folder and metrics."""
    run_dir = tmp_path_factory.mktemp("tp2-cp2") / "run"
    return run_dir, train(config, run_dir, 4, *TP2_CP2, "--parallel.sequence_parallel=true", "--train.activation_checkpointing=true")


def test_torchrun_tp2_cp2_with_sequence_parallelism_and_activation_checkpointing_matches_one_process(tp2_cp2_run, one_process):
    assert_same_run(tp2_cp2_run[1], one_process)


def lose_the_last_checkpoint(run_dir: Path) -> None:
    """As if the run crashed while writing its step-4 checkpoint: only step 2 is complete."""
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS}")
    (run_dir / "checkpoints" / f".step_{STEPS}.tmp").mkdir()  # a half-written checkpoint is ignored
    (run_dir / "metrics.jsonl").unlink()


@pytest.fixture(scope="module")
def crashed_tp2_cp2_run(tp2_cp2_run, tmp_path_factory) -> Path:
    """The tp=2 x cp=2 run as if it had crashed: its last complete checkpoint is step 2."""
    run_dir = Path(shutil.copytree(tp2_cp2_run[0], tmp_path_factory.mktemp("crashed") / "run"))
    lose_the_last_checkpoint(run_dir)
    return run_dir


# (tp4 resumes the hybrid's run below; tools/bench_parallel.py's reshard test goes from tp2 to cp2.)
RESHARDED = {"cp4": (4, ["--parallel.cp=4"]), "one-process": (1, []),
             "dp4-deepspeed-zero1": (4, ["--parallel.engine=deepspeed", "--parallel.zero_stage=1"])}


@pytest.mark.parametrize("layout", RESHARDED)
def test_resume_after_a_crash_continues_exactly_on_another_layout(layout, crashed_tp2_cp2_run, config, one_process, tmp_path):
    """The crashed tp=2 x cp=2 run resumes at step 2 under another layout (or DeepSpeed's engine) and produces
    the uninterrupted run's steps 3 and 4."""
    run_dir = Path(shutil.copytree(crashed_tp2_cp2_run, tmp_path / "run"))
    nproc, overrides = RESHARDED[layout]
    resumed = train(config, run_dir, nproc, *overrides)
    assert min(r["step"] for r in resumed) == 3
    assert_same_run(resumed, [r for r in one_process if r["step"] > 2])


def test_a_hybrid_resumes_on_another_layout(prepared_data, tmp_path):
    """debug-hybrid (Mamba-2, attention and MLP blocks): the one-process run's step-2 checkpoint, resumed under
    tp=2 x cp=2, continues it (tests/test_hybrid.py compares every layout with one process)."""
    config = tmp_path / "hybrid.toml"
    config.write_text(CONFIG.format(data=prepared_data, steps=STEPS).replace('preset = "debug"', 'preset = "debug-hybrid"'))
    run_dir = tmp_path / "run"
    one = train(config, run_dir, 1)
    lose_the_last_checkpoint(run_dir)
    assert_same_run(train(config, run_dir, 4, *TP2_CP2), [r for r in one if r["step"] > 2])


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_naming_it(crashed_tp2_cp2_run, config, one_process, tmp_path, capfd):
    run_dir = Path(shutil.copytree(crashed_tp2_cp2_run, tmp_path / "run"))
    damaged = Path(shutil.copytree(run_dir / "checkpoints" / "step_2", run_dir / "checkpoints" / "step_3"))
    for shard in damaged.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    result = run_trainer(config, run_dir, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    cut = damaged / "__0_0.distcp"
    assert f"warning: skipping damaged checkpoint {damaged}: cannot read {damaged}: {cut} is cut short (" in result.stdout, result.stdout
    assert f"resumed from {run_dir / 'checkpoints' / 'step_2'}" in result.stdout
    assert_same_run(read_metrics(run_dir), [r for r in one_process if r["step"] > 2])


def test_a_deepspeed_run_matches_one_process_and_its_checkpoint_resumes_under_ddp(config, one_process, tmp_path):
    """DeepSpeed ZeRO-2 (dp2 x tp2) trains as one process and writes the logical checkpoint DDP reads, optimizer
    state included (the other way: a DDP run resumed by ZeRO-1 above)."""
    run_dir = tmp_path / "run"
    zero2 = ["--parallel.tp=2", "--parallel.engine=deepspeed", "--parallel.zero_stage=2"]
    assert_same_run(train(config, run_dir, 4, *zero2), one_process)
    lose_the_last_checkpoint(run_dir)
    assert_same_run(train(config, run_dir, 1), [r for r in one_process if r["step"] > 2])


def killed_mid_run_and_restarted(config: Path, tmp_path: Path, agents: list[list[str]]) -> None:
    """Start the torchrun agents (one command each, the trainer's arguments appended), SIGKILL the last agent's worker
    after step 5 of 12 (its step-4 checkpoint complete); torchrun (--max-restarts 1) restarts every worker, they resume
    from the step-4 checkpoint (the lock of their run is theirs, and the checkpoint their launch's, though the command line
    says checkpoint.resume = 'none'), drop the log's records after step 4, and every step's record equals the uninterrupted
    run's."""
    long = ["--train.steps=12", "--train.eval_every=4"]
    reference = train(config, tmp_path / "reference", 1, *long)
    run_dir = tmp_path / "run"
    trainer = ["-m", "megassm.train", "--config", str(config), f"--run.dir={run_dir}", "--parallel.cp=2", *long,
               "--checkpoint.resume=none"]  # the restart goes on from its own checkpoint all the same
    jobs = [subprocess.Popen([*agent, *trainer], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=TRAINER_ENV)
            for agent in agents]
    metrics, step_4, deadline = run_dir / "metrics.jsonl", run_dir / "checkpoints" / "step_4", time.monotonic() + 300
    while not (metrics.exists() and '"step": 5,' in metrics.read_text() and step_4.exists()):
        assert all(job.poll() is None for job in jobs) and time.monotonic() < deadline, [job.communicate()[0][-3000:] for job in jobs]
        time.sleep(0.02)
    workers = [p for p in psutil.Process(jobs[-1].pid).children(recursive=True) if "megassm.train" in " ".join(p.cmdline())]
    workers[-1].send_signal(signal.SIGKILL)
    outputs = [job.communicate(timeout=300)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [output[-3000:] for output in outputs]
    output = "".join(outputs)
    assert f"resumed from {run_dir}/checkpoints/step_4 " in output and "no longer running" not in output, output[-3000:]
    steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines())]
    assert steps == list(range(1, 13))
    assert_same_run(read_metrics(run_dir), reference)


def test_a_rank_killed_mid_run_is_restarted_by_torchrun_and_the_run_ends_as_if_uninterrupted(config, tmp_path):
    """Plain torchrun on one node: its agent's store shared with the workers, each attempt under a prefix of its own."""
    killed_mid_run_and_restarted(config, tmp_path, [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                                     "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", RDZV_ENDPOINT]])


def test_a_rank_killed_on_one_of_two_nodes_is_restarted_on_both(config, tmp_path):
    """Two torchrun agents as on two nodes (megassm.torchrun, as launch/torchrun.sh runs it): the failed node counts a
    restart, the other does not (torchrun restarts it for the new membership), and both attempts still meet."""
    with reserved_port() as port:
        node = [sys.executable, "-m", "megassm.torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"]
        killed_mid_run_and_restarted(config, tmp_path, [node, node])


def test_a_node_that_loses_the_rendezvous_host_ends_with_one_line(config, tmp_path):
    """Two torchrun agents as on two nodes; the one hosting the rendezvous dies (its node failed): the other's worker
    fails with it (its own traceback), and its agent, trying to restart, finds no rendezvous: one line naming it, exit 1,
    not the agent's traceback."""
    with reserved_port() as port:
        node = [sys.executable, "-m", "megassm.torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--max-restarts", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lost", "-m", "megassm.train",
                "--config", str(config), f"--run.dir={tmp_path / 'run'}", "--parallel.cp=2", "--train.steps=100000",
                "--checkpoint.every=-1"]
        host = subprocess.Popen(node, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=TRAINER_ENV)
        time.sleep(1)  # the first agent binds the rendezvous port: it hosts the store
        other = subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=TRAINER_ENV)
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert host.poll() is None and other.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        host.kill()  # its worker dies with it (PR_SET_PDEATHSIG)
        host.wait()
        _, stderr = other.communicate(timeout=300)
    assert other.returncode == 1, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("megassm-torchrun:")]
    assert lines and lines[-1].startswith(f"megassm-torchrun: lost the rendezvous at 127.0.0.1:{port} ("), stderr[-3000:]
    assert "in next_rendezvous" not in stderr, stderr[-3000:]


def test_throughput_leaves_out_validation_and_checkpoints(config, tmp_path, monkeypatch):
    """tokens/s and MFU are the training's: a validation or a checkpoint (here each taking 1,000 s more on the
    throughput's clock, not on the wall's) does not count in the next interval."""
    from megassm import metrics
    from megassm.train import Trainer, main

    later, read = [0.0], []  # seconds the throughput's clock is ahead of time.perf_counter; its readings
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: read.append(1) or time.perf_counter() + later[0]))

    def taking_1000_s(method):
        return lambda self: later.__setitem__(0, later[0] + 1000) or method(self)

    monkeypatch.setattr(Trainer, "validation_losses", taking_1000_s(Trainer.validation_losses))
    monkeypatch.setattr(Trainer, "save", taking_1000_s(Trainer.save))
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), f"--run.dir={run_dir}", "--train.steps=6", "--train.log_every=2", "--train.eval_every=2",
                 "--checkpoint.every=2"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [2 * 8 * 88 / r["tokens_per_s"] for r in records if r["step"] > 2]  # 2 steps of 8 x 88 tokens a line
    assert len(seconds) == 2 and max(seconds) < 100, seconds
    assert later[0] == 6000 and read, "the throughput's clock was not the one moved: the test proves nothing"


def test_a_run_ending_on_an_error_closes_its_log(config, tmp_path, monkeypatch):
    """The progress bar, metrics.jsonl and wandb's run are closed also where the run stops on an error."""
    from megassm.data import DataError
    from megassm.metrics import MetricsLogger
    from megassm.train import Trainer, main

    def shard_gone(self):
        raise DataError("a shard went away")

    closed, close = [], MetricsLogger.close
    monkeypatch.setattr(MetricsLogger, "close", lambda self: closed.append(self) or close(self))
    monkeypatch.setattr(Trainer, "validation_losses", shard_gone)
    assert main(["--config", str(config), f"--run.dir={tmp_path / 'run'}", "--train.steps=4", "--checkpoint.every=-1"]) == 2
    assert len(closed) == 1


def test_bf16_autocast_stays_close_to_fp32(config, one_process, tmp_path):
    assert_same_run(train(config, tmp_path / "run", 1, "--train.precision=bf16", "--train.eval_every=0"),
                    [{k: v for k, v in r.items() if k != "val_loss"} for r in one_process], rel=2e-2)


def test_diverging_run_skips_steps_then_stops_with_advice(config, tmp_path):
    """lr = 1e30 makes the weights overflow after the first update: later steps are non-finite, skipped (each said),
    and after train.max_skipped_steps of them in a row the run stops with exit code 1 and one line. No checkpoint is
    written over the skipped steps: rotation would delete the one from before them."""
    command = [sys.executable, "-m", "megassm.train", "--config", str(config), f"--run.dir={tmp_path}", "--optim.lr=1e30",
               "--optim.min_lr=0", "--optim.warmup_steps=0", "--train.max_skipped_steps=3", "--train.steps=6", "--train.eval_every=0",
               "--train.log_every=2", "--checkpoint.every=1", "--checkpoint.keep=1", "--checkpoint.async_save=false"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "3 consecutive steps had a non-finite loss or gradient (the last: step 4); their updates were skipped and no checkpoint " \
           "written during them" in result.stderr.splitlines()[-1]
    said = [line for line in result.stdout.splitlines() if "update was skipped" in line]
    assert said == [f"step {n}: the loss or gradient is not finite; the step's update was skipped ({n - 1} in a row: the run stops at 3)"
                    for n in (2, 3)], result.stdout
    assert result.stderr.splitlines()[-1].endswith(f"then resume from {tmp_path / 'checkpoints' / 'step_1'}")
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in steps] == [1]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step_1"]
    # A run whose last steps are skipped ends with its checkpoint, which keeps the one from before them.
    result = subprocess.run([*command, "--train.max_skipped_steps=5", "--train.steps=4", f"--run.dir={tmp_path / 'ends'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (tmp_path / "ends" / "checkpoints").iterdir()) == ["step_1", "step_4"]
    assert f"saved checkpoint {tmp_path / 'ends' / 'checkpoints' / 'step_4'}" in result.stdout
    assert "after steps whose updates were skipped: the earlier checkpoints are kept" in result.stdout


def test_a_step_out_of_gpu_memory_stops_with_one_line_of_what_to_change(config, tmp_path, monkeypatch, capsys):
    """A step that runs out of GPU memory (raised here as PyTorch raises it on CUDA: the CPU has no such error) ends
    the run with exit code 1 and one line naming the step and what to change, the cheapest first; no traceback."""
    from megassm import train as trainer_module

    def out_of_memory(self, step, timer):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer_module.Trainer, "train_step", out_of_memory)
    code = trainer_module.main(["--config", str(config), f"--run.dir={tmp_path}", "--train.eval_every=0"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert last == ("megassm-train: error: the GPU ran out of memory in step 1 (176 tokens per micro batch and rank): lower "
                    "data.micro_batch (now 2; gradient accumulation keeps data.global_batch); or set "
                    "train.activation_checkpointing = true; or spread the sequence or the model over more GPUs (parallel.cp, "
                    "parallel.tp)")


def test_init_from_a_transformers_model_starts_from_its_weights(config, prepared_data, tmp_path):
    """checkpoint.init_from = a transformers Mamba2 folder: the first step's loss is that model's loss
    on the first global batch, computed here directly."""
    torch.manual_seed(1)
    model = Mamba2LM(ModelConfig.from_preset("debug", chunk_size=16)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_transformers(model.cfg, model.float().state_dict(), tmp_path / "hf")
    records = train(config, tmp_path / "run", 1, f"--checkpoint.init_from={tmp_path / 'hf'}", "--train.steps=1")
    batch = SampleLoader(TokenStream(prepared_data), seq_len=88, seed=0).batch(0, 8)
    with torch.no_grad():
        want = model.float()(batch.input_ids, batch.seq_idx, batch.labels).mean().item()
    assert records[0]["loss"] == pytest.approx(want, rel=1e-5)

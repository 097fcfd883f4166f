"""Checkpoints written while training goes on (megassm/checkpoint_writer.py): what is written is the state when the save
began, each rank copies only the items it writes, and a failed write on any rank stops the run with one line."""

from __future__ import annotations

import datetime
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter

from megassm.checkpoint import is_complete, load_checkpoint, start_checkpoint
from megassm.checkpoint_writer import HostCopies
from megassm.config import Config
from megassm.model import Mamba2LM, ModelConfig
from parallel import ParallelContext
from tests.distributed import run_distributed
from tests.test_convert import engine_for
from tests.test_run_safety import steps_logged
from megassm.train import Trainer
from tests.test_train import TRAINER_ENV, config, trainer_command  # noqa: F401 (config: a fixture)

TRAINER_STATE = {"step": 3, "samples": 24, "skipped_steps": 0}


def with_optimizer_state(model: Mamba2LM, engine) -> None:
    engine.optimizer.state.update({p: {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                                   for p in model.parameters()})


def held_writes(monkeypatch) -> threading.Event:
    """FileSystemWriter.write_data waits until the returned event is set (at most 60 s)."""
    release, write_data = threading.Event(), FileSystemWriter.write_data

    def held(self, plan, planner):
        assert release.wait(60), "the write was never released"
        return write_data(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", held)
    return release


def test_a_checkpoint_holds_the_state_when_its_save_began(tmp_path, monkeypatch):
    """The start returns before anything is written; weights and AdamW state changed after it (the next steps) do not
    reach the files, which hold the copies taken at the start."""
    torch.manual_seed(0)
    model = Mamba2LM(ModelConfig.from_preset("debug"))
    engine = engine_for(model)
    with_optimizer_state(model, engine)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {name: engine.optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}
    release = held_writes(monkeypatch)
    write = start_checkpoint(tmp_path, Config(model=model.cfg), model, engine, ParallelContext(), TRAINER_STATE, copies=HostCopies())
    assert not write.done()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            engine.optimizer.state[p]["exp_avg"].mul_(-1)
    release.set()
    write.wait()
    assert write.result == tmp_path / "checkpoints" / "step_3" and is_complete(write.result)

    torch.manual_seed(1)
    resumed = Mamba2LM(ModelConfig.from_preset("debug"))
    resumed_engine = engine_for(resumed)
    assert load_checkpoint(write.result, resumed, resumed_engine, ParallelContext())["step"] == 3
    for name, p in resumed.named_parameters():
        assert torch.equal(p, weights[name]), name
        assert torch.equal(resumed_engine.optimizer.state[p]["exp_avg"], moments[name]), name


def test_a_failed_write_leaves_no_complete_checkpoint_and_says_why(tmp_path, monkeypatch):
    def full(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    model = Mamba2LM(ModelConfig.from_preset("debug"))
    write = start_checkpoint(tmp_path, Config(model=model.cfg), model, engine_for(model), ParallelContext(), TRAINER_STATE)
    with pytest.raises(OSError, match="rank 0: OSError: .*No space left on device"):
        write.wait()
    assert not (tmp_path / "checkpoints" / "step_3").exists()


def check_shares(run_dir: Path, failing_rank: int | None) -> None:
    """dp2: every item replicated over DP is copied and written by one rank only; the checkpoint equals the state at
    its start. With `failing_rank`, that rank's write fails: every rank learns it from the coordinator, naming the rank."""
    from parallel import DDPEngine, init_parallel

    ctx = init_parallel(dp=2, backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Mamba2LM(ModelConfig.from_preset("debug"), ctx)
    engine = DDPEngine(model, ctx, [{"params": list(model.parameters())}], lr=0.0)
    with_optimizer_state(model, engine)  # the same on both ranks (one seed)
    copied, copy, write_data = set(), HostCopies.copied, FileSystemWriter.write_data
    HostCopies.copied = lambda self, tensors: copied.update(index.fqn for index in tensors) or copy(self, tensors)

    def failing(self, plan, planner):
        if rank == failing_rank:
            raise OSError(5, "Input/output error")
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = failing
    write = start_checkpoint(run_dir, Config(model=model.cfg), model, engine, ctx, TRAINER_STATE, copies=HostCopies())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    if failing_rank is not None:
        with pytest.raises(OSError, match=f"rank {failing_rank}: OSError: .*Input/output error"):
            write.wait()  # on every rank: the coordinator's outcome
        return
    write.wait()
    everyone = [None, None]
    dist.all_gather_object(everyone, copied)
    assert not everyone[0] & everyone[1]  # each tensor copied to host memory by one rank
    assert everyone[0] and everyone[1]  # both ranks share the work
    weights = {fqn for fqn in everyone[0] | everyone[1] if fqn.startswith("model.")}
    assert weights == {f"model.{name}" for name, _ in model.named_parameters()}
    assert (write.result == run_dir / "checkpoints" / "step_3") if rank == 0 else write.result is None


def test_over_data_parallel_ranks_each_item_is_copied_and_written_once(tmp_path):
    run_distributed(check_shares, 2, tmp_path, None)
    torch.manual_seed(0)  # the state the ranks had at the start of the save
    model = Mamba2LM(ModelConfig.from_preset("debug"))
    engine = engine_for(model)
    with_optimizer_state(model, engine)
    fresh = Mamba2LM(ModelConfig.from_preset("debug"))
    fresh_engine = engine_for(fresh)
    load_checkpoint(tmp_path / "checkpoints" / "step_3", fresh, fresh_engine, ParallelContext())
    for (name, got), want in zip(fresh.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(got, want), name
        assert torch.equal(fresh_engine.optimizer.state[got]["exp_avg_sq"], engine.optimizer.state[want]["exp_avg_sq"]), name


def test_a_write_that_fails_on_another_rank_is_reported_by_the_coordinator(tmp_path):
    run_distributed(check_shares, 2, tmp_path, 1)
    assert not (tmp_path / "checkpoints" / "step_3").exists()


def check_every_rank_waits_for_the_coordinator(run_dir: Path) -> None:
    from parallel import DDPEngine, init_parallel

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))  # a collective's timeout, shorter than the write
    ctx = init_parallel(dp=2)
    model = Mamba2LM(ModelConfig.from_preset("debug"), ctx)
    engine = DDPEngine(model, ctx, [{"params": list(model.parameters())}], lr=0.0)
    write_data = FileSystemWriter.write_data

    def slow_on_rank_0(self, plan, planner):
        if dist.get_rank() == 0:
            time.sleep(6)
        return write_data(self, plan, planner)

    FileSystemWriter.write_data = slow_on_rank_0
    write = start_checkpoint(run_dir, Config(model=model.cfg), model, engine, ctx, TRAINER_STATE, copies=HostCopies())
    write.wait()
    assert is_complete(run_dir / "checkpoints" / "step_3")
    dist.barrier()  # within the timeout: rank 1 waited for the checkpoint through the store, not in a collective


def test_a_rank_waits_for_the_whole_checkpoint_past_a_collectives_timeout(tmp_path):
    """Rank 0's write takes longer than a collective may wait: rank 1's wait ends once the checkpoint is complete, and
    the ranks meet again within the timeout."""
    run_distributed(check_every_rank_waits_for_the_coordinator, 2, tmp_path)


def test_the_trainer_stops_with_one_line_when_a_checkpoint_cannot_be_written(config, tmp_path, monkeypatch, capsys):
    """A write that fails while training goes on stops the run at the next step (not at the next checkpoint's) with
    one line naming the checkpoint and the cause, exit code 2 (not restarted); nothing incomplete is named a
    checkpoint."""
    from megassm.train import main

    def full(self, plan, planner):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), f"--run.dir={run_dir}", "--train.steps=9", "--checkpoint.every=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"megassm-train: error: checkpoint {run_dir}/checkpoints/step_3 could not be written (rank 0: OSError: [Errno 28] "
                   "No space left on device); the run stops rather than train on without checkpoints: free space or fix "
                   f"{run_dir}, then resume"], err
    assert not list((run_dir / "checkpoints").glob("step_*"))
    assert steps_logged(run_dir)[-1] in (3, 4)  # found by a later step's poll (its record not logged), not at step 6's save


def test_without_async_save_no_host_copy_is_made(config, tmp_path, monkeypatch):
    from megassm.train import main

    monkeypatch.setattr(HostCopies, "copied", lambda self, tensors: pytest.fail("copied to host memory"))
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), f"--run.dir={run_dir}", "--train.steps=2", "--checkpoint.every=1",
                 "--checkpoint.async_save=false"]) == 0
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step_*"))] == ["step_1", "step_2"]


def test_where_host_memory_lacks_room_checkpoints_are_written_while_training_waits(config, tmp_path, monkeypatch, capsys):
    """A host copy larger than half the host memory left to the process is not made: each checkpoint is written from
    the live state, complete before training goes on, and the run says so once."""
    from megassm import host_memory, train
    from megassm.train import main

    monkeypatch.setattr(host_memory, "available", lambda: 64 << 10)  # the debug model's copies take ~0.4 MiB
    monkeypatch.setattr(train, "check_weights_fit", lambda *args: None)  # which would refuse a model of more than 64 KiB
    monkeypatch.setattr(HostCopies, "_carved", lambda tensors: pytest.fail("host copies made"))
    save, waited = Trainer.save, []
    monkeypatch.setattr(Trainer, "save", lambda self: save(self) or waited.append(self.saving is None))  # none in flight
    run_dir = tmp_path / "run"
    assert main(["--config", str(config), f"--run.dir={run_dir}", "--train.steps=3", "--checkpoint.every=1"]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "host memory" in line]
    assert len(warnings) == 1 and "would take 0.0 GiB of host memory on a process with 0.0 GiB left" in warnings[0], warnings
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step_*"))] == ["step_1", "step_2", "step_3"]
    assert waited == [True, True, True]


def check_one_rank_short_of_host_memory(run_dir: Path) -> None:
    from megassm import host_memory
    from parallel import DDPEngine, init_parallel

    ctx = init_parallel(dp=2, backend="gloo")
    host_memory.available = lambda: (64 << 10) if dist.get_rank() == 1 else (1 << 40)
    HostCopies._carved = lambda tensors: pytest.fail("host copies made")
    model = Mamba2LM(ModelConfig.from_preset("debug"), ctx)
    engine = DDPEngine(model, ctx, [{"params": list(model.parameters())}], lr=0.0)
    store = dist.distributed_c10d._get_default_store()
    keys = store.num_keys()
    write = start_checkpoint(run_dir, Config(model=model.cfg), model, engine, ctx, TRAINER_STATE, copies=HostCopies())
    needed, left = write.short_of_host_memory  # rank 1's, on both ranks
    assert not write.copied and left == (64 << 10) // 2 and needed > left / 2  # the node's memory shared by its 2 processes
    write.wait()
    assert is_complete(run_dir / "checkpoints" / "step_3")
    if dist.get_rank() == 0:  # returns last: every key of the write deleted
        assert store.num_keys() == keys


def test_where_one_rank_lacks_host_memory_every_rank_waits_for_the_checkpoint(tmp_path):
    """Rank 1's node has no room for its copies: neither rank copies (the other would otherwise train on into a
    collective that waits for rank 1's write), both know why, and the write leaves nothing in the job's store."""
    run_distributed(check_one_rank_short_of_host_memory, 2, tmp_path)


def test_host_copies_count_the_memory_they_would_newly_take():
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from megassm.checkpoint_writer import _allocated

    tensors = {MetadataIndex("a"): torch.randn(100), MetadataIndex("b"): torch.randn(30)}  # 448 + 128 bytes, aligned
    copies = HostCopies()
    assert copies.new_bytes(tensors) == 576
    copies.copied(tensors)
    assert copies.new_bytes({i: t + 1 for i, t in tensors.items()}) == 0  # the same layout: the copies are reused
    assert copies.new_bytes({**tensors, MetadataIndex("c"): torch.randn(1)}) == 640
    assert (_allocated(576, pinned=True), _allocated(1024, pinned=True), _allocated(576, pinned=False)) == (1024, 1024, 576)


def check_failure_stops_every_rank() -> None:
    from megassm.checkpoint import CheckpointError
    from megassm.stopping import FailedElsewhere, StopSignals

    dist.init_process_group("gloo")
    failure = CheckpointError("disk full") if dist.get_rank() == 0 else None
    with StopSignals(lambda signum: "stopped") as signals:
        assert signals.requested(torch.device("cpu")) is None
        assert signals.requested(torch.device("cpu"), failure) is None  # reduced now, read at the next step
        with pytest.raises(CheckpointError if failure else FailedElsewhere):
            signals.requested(torch.device("cpu"), failure)


def test_a_failure_on_one_rank_stops_every_rank_after_the_same_step():
    run_distributed(check_failure_stops_every_rank, 2)


def test_host_copies_share_slabs_and_are_reused_while_the_items_stay_the_same(monkeypatch):
    """Copies are carved out of slabs of SLAB_BYTES (a tensor larger than one gets its own buffer), none overlapping
    another, each equal to its tensor and with a storage of its own size (DCP's writer clones a tensor whose storage is
    larger); the next checkpoint of the same items reuses them."""
    from megassm import checkpoint_writer
    from torch.distributed.checkpoint.metadata import MetadataIndex

    monkeypatch.setattr(checkpoint_writer, "SLAB_BYTES", 1024)
    tensors = {MetadataIndex(f"t{i}"): torch.randn(n) for i, n in enumerate((100, 100, 30, 600, 7, 50))}  # fp32: 600 > 1024 bytes
    copies = HostCopies()
    first = copies.copied(tensors)
    assert all(torch.equal(first[i], t) and first[i].untyped_storage().nbytes() == t.nbytes for i, t in tensors.items())
    start = [c.data_ptr() for c in first.values()]
    # [t0 t1 t2] fill a slab (448 + 448 + 128 bytes, each rounded up to 64), t3 has its own, [t4 t5] share the last
    assert (start[1] - start[0], start[2] - start[0], start[5] - start[4]) == (448, 896, 64)
    spans = sorted((c.data_ptr(), c.data_ptr() + c.nbytes) for c in first.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    again = copies.copied({i: t * 2 for i, t in tensors.items()})
    assert all(again[i].data_ptr() == first[i].data_ptr() and torch.equal(again[i], t * 2) for i, t in tensors.items())


FAILING_RANK_1 = """\
import os
if os.environ.get("RANK") == "1":  # a worker of the test's job (the launcher has no RANK)
    from torch.distributed.checkpoint import FileSystemWriter

    def full(self, plan, planner):
        raise OSError(28, "No space left on device")

    FileSystemWriter.write_data = full
if os.environ.get("RANK") == "0":  # rank 0's write ends last: it waits a second longer for the others to read the outcome
    import time
    from megassm import job_store

    collect = job_store._collect

    def slow_reads(key, *args, **kwargs):
        if key.endswith("/read"):
            time.sleep(1)
        return collect(key, *args, **kwargs)

    job_store._collect = slow_reads
"""


def test_under_torchrun_a_write_failing_on_another_rank_stops_the_job_with_one_line(config, tmp_path):
    """Rank 1 cannot write its part of a checkpoint (Python's sitecustomize breaks its writer): every rank stops after the
    same step, long before the next checkpoint, rank 0 prints the one line naming the rank and the cause (also where
    rank 1 learns of the failure first), exit code 2, no traceback, no wait for the launcher's timeouts."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAILING_RANK_1)
    env = {**TRAINER_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(inject), TRAINER_ENV.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = subprocess.run(trainer_command(config, run_dir, 2, "--train.steps=30", "--checkpoint.every=6"), capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert steps_logged(run_dir)[-1] < 12  # stopped by the step's stop flags, not by the next checkpoint's start
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert lines == [f"megassm-train: error: checkpoint {run_dir}/checkpoints/step_6 could not be written (rank 1: OSError: [Errno 28] "
                     "No space left on device); the run stops rather than train on without checkpoints: free space or fix "
                     f"{run_dir}, then resume"], result.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob("step_*")) and time.monotonic() - started < 120


def test_a_run_ending_on_an_error_gives_the_checkpoint_being_written_time_to_end(config, tmp_path, monkeypatch):
    """A step failing while a checkpoint is written (here: out of memory at step 3, the step-2 checkpoint's write
    slow): the process does not end in the middle of the write, and the checkpoint, which needs nothing from another
    rank, completes."""
    import megassm.train as train

    write_data, train_step = FileSystemWriter.write_data, train.Trainer.train_step

    def slow(self, plan, planner):
        time.sleep(1.5)
        return write_data(self, plan, planner)

    def failing(self, step, timer):
        if step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return train_step(self, step, timer)

    monkeypatch.setattr(FileSystemWriter, "write_data", slow)
    monkeypatch.setattr(train.Trainer, "train_step", failing)
    run_dir = tmp_path / "run"
    assert train.main(["--config", str(config), f"--run.dir={run_dir}", "--train.steps=4", "--checkpoint.every=2"]) == 1
    assert is_complete(run_dir / "checkpoints" / "step_2")

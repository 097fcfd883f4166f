"""A run folder belongs to one run and no checkpoint is lost: the trainer through its entry point on a tiny CPU
run. Wherever a run must stop, it prints one line, exits with status 2 and leaves every file of the folder
byte for byte as it was."""

import errno
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest
import torch

from megassm.checkpoint import (CheckpointError, IncompatibleCheckpoint, decided_by_first, load_checkpoint, resume_candidates,
                                save_checkpoint, start_checkpoint)
from megassm.config import Config, load_config
from megassm.data import SampleLoader, TokenStream, train_sentencepiece
from megassm.data.corpus import builtin_documents, write_builtin_corpus
from megassm.data.prepare import prepare
from megassm.data.shards import VERIFIED_FILE
from megassm.errors import STOPPED_WHILE_STARTING, imports_done, quiet_interrupt_while_importing
from megassm.metrics import read_metrics
from megassm.model import Mamba2LM, ModelConfig
from megassm.optim import learning_rate
from megassm.run_dir import Owner, RunDirError, RunLock, restarted
from megassm.stopping import StopSignals, Stopped
from megassm.train import LAUNCH_ENV, OutOfMemory, Trainer, adamw_change, limit_cpu_threads, moved_to, schedule_change
from parallel import ParallelContext
from tests.distributed import reserved_port, run_distributed
from tests.test_convert import engine_for
from tests.test_train import TRAINER_ENV, assert_same_run, config, run_trainer, train, trainer_command  # noqa: F401 (config: a fixture)


def hashes(run_dir: Path) -> dict[str, str]:
    """The sha256 of every file under run_dir, by path."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def refused(result: subprocess.CompletedProcess, *phrases: str) -> None:
    """The run stopped at start-up with exit status 2 and one line (no traceback) holding every phrase."""
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megassm-train: error: "), result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished(config: Path, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A finished run of 4 steps (checkpoints step_2 and step_4) and its metrics records."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    return run_dir, train(config, run_dir, 1)


@pytest.fixture
def old_run(finished, tmp_path) -> Path:
    """A copy of the finished run, for a test to run into."""
    return Path(shutil.copytree(finished[0], tmp_path / "old"))


def assert_refused_and_untouched(config: Path, run_dir: Path, overrides: list[str], *phrases: str, into: Path | None = None) -> None:
    """A run in `into` (run_dir when None) with these overrides stops with one line; run_dir's files are unchanged."""
    before = hashes(run_dir)
    refused(run_trainer(config, into or run_dir, 1, *overrides), *phrases)
    assert hashes(run_dir) == before


def test_resume_auto_with_another_model_stops_naming_the_key_and_both_values(config, old_run):
    assert_refused_and_untouched(config, old_run, ["--model.d_model=128"],
                                 f"{old_run}/checkpoints/step_4 holds another model: model.d_model = 64 there, 128 in this config",
                                 "another run.dir")


def test_under_torchrun_the_same_stop_is_one_line_from_rank_0(config, old_run):
    """Neither a worker nor torchrun (as launch/torchrun.sh runs it) prints a traceback: the one line is all."""
    before = hashes(old_run)
    result = run_trainer(config, old_run, 2, "--parallel.cp=2", "--model.d_model=128")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        f"megassm-train: error: {old_run}/checkpoints/step_4 holds another model: model.d_model = 64 there, 128 in this config; "
        "start a new run in another run.dir to train this one, or resume with that value"]
    assert hashes(old_run) == before


def test_an_explicit_checkpoint_of_another_model_stops_naming_the_key_and_both_values(config, old_run, tmp_path):
    assert_refused_and_untouched(config, old_run, [f"--checkpoint.resume={old_run}/checkpoints/step_4", "--model.d_state=32"],
                                 "model.d_state = 16 there, 32 in this config", into=tmp_path / "new" / "runs" / "a")
    assert not (tmp_path / "new").exists()  # the failed start's run.dir and the parents it made, left empty, are removed


@pytest.fixture(scope="module")
def data_of_another_tokenizer(tmp_path_factory) -> Path:
    """The corpus of prepared_data, tokenized by a 384-token sentencepiece model (ids that fit the debug model)."""
    root = tmp_path_factory.mktemp("other-tokenizer")
    corpus = write_builtin_corpus(root / "corpus.jsonl", max_documents=80)
    tokenizer = train_sentencepiece(builtin_documents(), vocab_size=384, out_dir=root / "tokenizer", max_sentences=20000)
    return prepare([corpus], tokenizer, root / "prepared", num_proc=1, val_fraction=0.05, cache_dir=root / "cache")


def test_resume_with_another_tokenizer_stops(config, old_run, data_of_another_tokenizer):
    assert_refused_and_untouched(config, old_run, [f"--data.path={data_of_another_tokenizer}"],
                                 f"{old_run}/checkpoints/step_4 was trained with another tokenizer (512 tokens", "(384 tokens")


def test_a_checkpoint_with_other_tensor_shapes_is_incompatible_not_damaged(tmp_path):
    """Behind a config.toml that does not tell, DCP's size mismatch is named: tensor and both shapes."""
    saved, wanted = Mamba2LM(ModelConfig.from_preset("debug")), Mamba2LM(ModelConfig.from_preset("debug", d_state=32))
    path = save_checkpoint(tmp_path, Config(model=wanted.cfg), saved, engine_for(saved), ParallelContext(),
                           {"step": 1, "samples": 8, "skipped_steps": 0})
    name = next(n for n, p in saved.named_parameters() if p.shape != wanted.get_parameter(n).shape)
    shapes = f"tensor {name} is {tuple(saved.get_parameter(name).shape)} there, {tuple(wanted.get_parameter(name).shape)} in this model"
    with pytest.raises(IncompatibleCheckpoint, match=re.escape(shapes)):
        load_checkpoint(path, wanted, engine_for(wanted), ParallelContext())


def test_the_log_of_a_run_without_checkpoints_is_not_taken_over_by_another(config, tmp_path):
    """A run with checkpoint.every = -1 leaves only its log and config: another run started in its folder stops,
    naming what differs, and touches nothing; the same run started again (a restart before its first checkpoint)
    and a run with checkpoint.overwrite = true go on."""
    run_dir, once = tmp_path / "run", ["--train.steps=2", "--checkpoint.every=-1"]
    assert run_trainer(config, run_dir, 1, *once).returncode == 0
    logged = steps_logged(run_dir)
    assert_refused_and_untouched(config, run_dir, [*once, "--optim.lr=1e-3"],
                                 "holds the log of another run (metrics.jsonl; optim.lr 0.003 -> 0.001)",
                                 "choose another run.dir, or set checkpoint.overwrite = true to replace that log")
    assert run_trainer(config, run_dir, 1, *once).returncode == 0
    assert steps_logged(run_dir) == logged
    replaced = run_trainer(config, run_dir, 1, *once, "--optim.lr=1e-3", "--checkpoint.overwrite=true")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert load_config(run_dir / "config.toml", world_size=None).optim.lr == 1e-3


@pytest.mark.parametrize("mistake, line", [
    ("--checkpoint.resume=/nonexistent/step_3", "checkpoint.resume = /nonexistent/step_3: no such folder; checkpoint.resume takes"),
    ("--checkpoint.init_from=/nonexistent", "checkpoint.init_from: /nonexistent: no such folder"),
], ids=["resume", "init_from"])
def test_checkpoint_mistakes_are_said_before_the_data_is_hashed(config, prepared_data, tmp_path, mistake, line):
    """Hashing a large corpus's shards takes a while (once per copy of the data): a mistake in the checkpoints to start
    from is said first, naming the key."""
    data = Path(shutil.copytree(prepared_data, tmp_path / "data"))
    (data / VERIFIED_FILE).unlink(missing_ok=True)
    refused(run_trainer(config, tmp_path / "run", 1, f"--data.path={data}", mistake), line)
    assert not (data / VERIFIED_FILE).exists()


def test_a_run_resumed_on_another_sample_order_says_so(config, old_run):
    """The samples consumed count from the checkpoint indexes the order of the samples; where the data, seq_len or
    seed changed, that is another order: the run goes on, with a warning. Resumed as trained: no warning."""
    warning = "warning: the data (or a mixture's weights), data.seq_len or run.seed differ from those"
    same = run_trainer(config, old_run, 1, "--train.steps=5", "--checkpoint.every=-1")
    assert same.returncode == 0 and "resumed from" in same.stdout and warning not in same.stdout, same.stdout[-3000:]
    other = run_trainer(config, old_run, 1, "--train.steps=5", "--checkpoint.every=-1", "--run.seed=7")
    assert other.returncode == 0, other.stderr[-3000:]
    assert (f"{warning} {old_run}/checkpoints/step_4 was trained with: the run goes on from sample 32 of another order, some "
            "samples it saw may come again") in other.stdout


def test_a_run_resumed_on_another_learning_rate_schedule_says_by_how_much(config, old_run):
    """The rate is a function of the step and train.steps (the cosine's length): raising train.steps to train further
    makes it jump, which the run says."""
    optim = load_config(config, world_size=None).optim
    other = run_trainer(config, old_run, 1, "--train.steps=8", "--checkpoint.every=-1")
    assert other.returncode == 0, other.stderr[-3000:]
    assert (f"warning: the learning-rate schedule differs from the one {old_run}/checkpoints/step_4 was trained with (train.steps "
            f"4 -> 8): step 5 runs at {learning_rate(4, optim, 8):.2e} where that run's would have run at "
            f"{learning_rate(4, optim, 4):.2e}") in other.stdout, other.stdout[-3000:]


def test_a_schedule_changed_where_the_rate_goes_on_as_before_is_said_without_a_warning():
    """train.steps raised during the warm-up (the cosine not yet begun): the rate goes on without a jump, which the
    line says instead of warning of one; the same schedule says nothing."""
    theirs = Config()
    theirs.train = replace(theirs.train, steps=60)
    ours = Config()
    ours.train = replace(ours.train, steps=90)
    assert theirs.optim.warmup_steps > 61
    assert schedule_change(theirs, theirs, 60, Path("step_60")) is None
    assert schedule_change(theirs, ours, 60, Path("step_60")) == (
        "the learning-rate schedule differs from the one step_60 was trained with (train.steps 60 -> 90): step 61 runs at "
        f"{learning_rate(60, ours.optim, 90):.2e} as it would have, and the rate follows this run's schedule from there")


def test_a_warmup_stable_decay_run_extended_before_its_decay_goes_on_without_a_jump():
    """The point of decay_fraction: a checkpoint from the stable phase trains further with more train.steps at lr, its
    decay moved to the new end; raising train.steps during the decay makes the rate jump, which is warned of."""
    theirs = Config()
    theirs.train, theirs.optim = replace(theirs.train, steps=1000), replace(theirs.optim, warmup_steps=100, decay_fraction=0.2)
    ours = Config()
    ours.train, ours.optim = replace(theirs.train, steps=3000), theirs.optim
    assert schedule_change(theirs, ours, 700, Path("step_700")).startswith(
        f"the learning-rate schedule differs from the one step_700 was trained with (train.steps 1000 -> 3000): step 701 runs at "
        f"{theirs.optim.lr:.2e} as it would have")
    assert schedule_change(theirs, ours, 900, Path("step_900")).startswith("warning: ")
    cosine = Config()
    cosine.train, cosine.optim = theirs.train, replace(theirs.optim, decay_fraction=None)
    assert "(optim.decay_fraction None -> 0.2)" in schedule_change(cosine, theirs, 700, Path("step_700"))


def test_adamw_settings_changed_on_resume_are_said_and_apply():
    theirs, ours = Config(), Config()
    ours.optim = replace(ours.optim, weight_decay=0.0, beta2=0.99)
    assert adamw_change(theirs, theirs, 60, Path("step_60")) is None
    assert adamw_change(theirs, ours, 60, Path("step_60")) == (
        "AdamW's settings differ from those step_60 was trained with (optim.weight_decay 0.1 -> 0.0, optim.beta2 0.95 -> 0.99): "
        "this run's apply from step 61 on")


def test_a_mistake_met_before_the_ranks_join_is_said_by_the_node_that_met_it(config, tmp_path):
    """A rank other than 0 that stops before the process group exists (its node's copy of the config missing) says so
    itself, its node's first process only (rank 0 may never learn of it)."""
    missing = tmp_path / "missing.toml"
    for local_rank, said in (("0", True), ("1", False)):
        env = {**TRAINER_ENV, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": local_rank}
        result = subprocess.run([sys.executable, "-m", "megassm.train", "--config", str(missing), f"--run.dir={tmp_path / 'run'}"],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        if said:
            assert len(lines) == 1 and lines[0].startswith(f"megassm-train: error on rank 1 ({socket.gethostname()}): ") \
                and str(missing) in lines[0], lines
        else:
            assert lines == []


def two_nodes(config: Path, run_dir: Path, *second_node: str) -> list[str]:
    """The trainer started by two torchrun agents as on two nodes (the first hosts the rendezvous: its worker is rank
    0), the second's with `second_node` overrides; both must end within two minutes, failed: their `megassm-train:`
    lines."""
    with reserved_port() as port:
        node = [sys.executable, "-m", "megassm.torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", "-m", "megassm.train", "--config", str(config),
                f"--run.dir={run_dir}"]
        started = time.monotonic()
        first = subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=TRAINER_ENV)
        time.sleep(1)
        second = subprocess.Popen([*node, *second_node], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=TRAINER_ENV)
        outputs = [process.communicate(timeout=300) for process in (first, second)]
    assert time.monotonic() - started < 120
    assert first.returncode != 0 and second.returncode != 0, outputs
    return [line for _, stderr in outputs for line in stderr.splitlines() if line.startswith("megassm-train:")]


def test_a_mistake_of_one_nodes_data_stops_every_node_at_once_with_its_line(config, tmp_path):
    """The second node's copy of the data missing: its rank meets that once the ranks have joined, and every rank stops
    with rank 0 saying it, where the first node's rank waited for the other until the process group's timeout."""
    missing = tmp_path / "missing"
    assert two_nodes(config, tmp_path / "run", f"--data.path={missing}") == [
        f"megassm-train: error: on rank 1 ({socket.gethostname()}): {missing}: no such data folder; make one with python "
        f"tools/prepare_data.py --out {missing} ..."]


def test_a_run_dir_in_use_stops_every_node_at_once(config, tmp_path):
    """Rank 0 finds run.dir locked by a live run (this test's process): the other node's rank stops with it."""
    with RunLock(tmp_path / "run", print):
        said = two_nodes(config, tmp_path / "run")
    assert len(said) == 1 and said[0].startswith(f"megassm-train: error: on rank 0 ({socket.gethostname()}): run.dir = "
                                                 f"{tmp_path / 'run'} is in use by another run (pid {os.getpid()} on "), said


def test_a_validation_larger_than_the_validation_split_says_so(config, tmp_path):
    windows = SampleLoader(TokenStream(load_config(config).data.path), seq_len=88, seed=0, split="val").num_windows
    result = run_trainer(config, tmp_path / "run", 1, "--train.steps=2", "--checkpoint.every=-1",
                         f"--train.eval_samples={2 * windows + 2}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"warning: train.eval_samples = {2 * windows + 2}, but the validation split holds {windows} samples of data.seq_len "
            "tokens: some count more than once") in result.stdout


def test_a_save_that_never_finished_is_deleted_when_the_run_goes_on(config, old_run):
    unfinished = old_run / "checkpoints" / ".step_5.tmp"  # the run stopped while saving step 5 (a preemption)
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"half a checkpoint")
    result = run_trainer(config, old_run, 1, "--train.steps=5", "--checkpoint.every=-1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"deleted {unfinished}: a save that never finished" in result.stdout and not unfinished.exists()


def test_a_checkpoint_is_on_disk_before_it_is_named_complete(tmp_path, monkeypatch):
    """Its small files and its folder are synced before the rename that completes it, the folder holding it after:
    a node's crash cannot leave a complete checkpoint whose trainer.json never reached the disk (DCP syncs its own)."""
    events, fsync, rename = [], os.fsync, Path.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))[1])
    monkeypatch.setattr(Path, "rename", lambda self, target: (events.append(f"rename {self.name}"), rename(self, target))[1])
    model = Mamba2LM(ModelConfig.from_preset("debug"))
    save_checkpoint(tmp_path, Config(model=model.cfg), model, engine_for(model), ParallelContext(),
                    {"step": 1, "samples": 8, "skipped_steps": 0}, vocabulary={"a": 0})
    temporary, checkpoints = tmp_path / "checkpoints" / ".step_1.tmp", tmp_path / "checkpoints"
    ours = events[events.index(str(temporary / "config.toml")):]
    assert ours == [str(temporary / name) for name in ("config.toml", "vocabulary.json", "trainer.json")] + [
        str(temporary), "rename .step_1.tmp", str(checkpoints)], events


@pytest.mark.parametrize("resume, phrases", [
    ("none", ["holds the checkpoints of another run (step_2, step_4) and checkpoint.resume = 'none' starts a new run",
              "checkpoint.overwrite = true"]),
    ("{run}/checkpoints/step_2", ["holds checkpoints after step_2 (step_4)", "checkpoint.resume = 'auto'", "checkpoint.overwrite = true"]),
], ids=["from-scratch", "from-an-older-checkpoint"])
def test_a_run_outside_the_history_of_the_folder_stops(resume, phrases, config, old_run):
    assert_refused_and_untouched(config, old_run, [f"--checkpoint.resume={resume.format(run=old_run)}"], *phrases)


def test_a_requeued_slurm_job_goes_on_from_its_own_checkpoint_whatever_resume_says(config, tmp_path):
    """Slurm requeues a job with its first command line (here checkpoint.resume = 'none', which would refuse the folder's
    checkpoints): the job's own newest checkpoint is resumed; another command in that job, not requeued, and another
    job with that command line stop as any run from scratch in that folder does."""
    run_dir = tmp_path / "run"

    def job(slurm_job: str, requeued: int, steps: int) -> subprocess.CompletedProcess:
        command = trainer_command(config, run_dir, 1, "--checkpoint.resume=none", f"--train.steps={steps}", "--train.eval_every=0")
        return subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**TRAINER_ENV, "SLURM_JOB_ID": slurm_job, "SLURM_RESTART_COUNT": str(requeued)})

    assert job("41", 0, 2).returncode == 0
    from_scratch = "holds the checkpoints of another run (step_2) and checkpoint.resume = 'none' starts a new run"
    refused(job("41", 0, 4), from_scratch)
    requeued = job("41", 1, 4)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"{run_dir}/checkpoints/step_2 was written by this launch (restarted or requeued): going on from there" in requeued.stdout
    assert f"resumed from {run_dir}/checkpoints/step_2" in requeued.stdout and steps_logged(run_dir) == [1, 2, 3, 4]
    refused(job("42", 1, 6), from_scratch.replace("(step_2)", "(step_2, step_4)"))


@pytest.mark.parametrize("mine, earlier, restarted_", [
    ({"slurm_job": "7", "slurm_restart": 1, "agent": "a:1", "agent_restart": 0}, {"slurm_job": "7", "slurm_restart": 0}, True),
    ({"slurm_job": "7", "slurm_restart": 0, "agent": "a:1", "agent_restart": 0}, {"slurm_job": "7", "slurm_restart": 0}, False),
    ({"slurm_job": "8", "slurm_restart": 1, "agent": None, "agent_restart": 0}, {"slurm_job": "7", "slurm_restart": 0}, False),
    ({"slurm_job": None, "slurm_restart": 0, "agent": "a:1", "agent_restart": 2}, {"agent": "a:1", "agent_restart": 1}, True),
    ({"slurm_job": None, "slurm_restart": 0, "agent": "a:1", "agent_restart": 0}, {"agent": "a:1", "agent_restart": 0}, False),
    ({"slurm_job": None, "slurm_restart": 0, "agent": "b:1", "agent_restart": 1}, {"agent": "a:1", "agent_restart": 0}, False),
    ({"slurm_job": None, "slurm_restart": 0, "agent": "a:1:200", "agent_restart": 1}, {"agent": "a:1:100", "agent_restart": 0}, False),
    ({"slurm_job": "7", "slurm_restart": 0, "agent": "a:1", "agent_restart": 1}, {"slurm_job": "7", "slurm_restart": 0,
                                                                                 "agent": "a:1", "agent_restart": 0}, True),
], ids=["requeued", "same-job-again", "other-job", "agent-restart", "same-agent-pid-again", "other-agent", "other-agent-same-pid",
        "agent-restart-in-job"])
def test_a_restart_is_a_later_start_of_the_same_launch(mine, earlier, restarted_):
    """A Slurm job requeued since (SLURM_RESTART_COUNT), or a torchrun agent restarting its workers
    (TORCHELASTIC_RESTART_COUNT); a new command in the same job, or a new agent whose pid a container repeats (the agent
    is host:pid:start time), is not."""
    assert restarted(mine, earlier) == restarted_


def test_overwrite_replaces_the_other_history_and_its_metrics(config, old_run):
    result = run_trainer(config, old_run, 1, "--checkpoint.resume=none", "--checkpoint.overwrite=true", "--train.steps=1",
                         "--checkpoint.every=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"deleted step_2, step_4 of another history from {old_run}" in result.stdout
    assert checkpoint_names(old_run) == ["step_1"] and steps_logged(old_run) == [1]


def test_a_stray_step_folder_is_neither_resumed_nor_rotated_nor_counted(config, old_run):
    """A half-copied step_900 (trainer.json alone): the run resumes from step_4, and with keep = 1 rotation deletes
    the folder's history before it (step_2 of the run before the restart, step_4 it resumed from, step_5: restarts
    leave no more than checkpoint.keep), never step_900."""
    stray = old_run / "checkpoints" / "step_900"
    stray.mkdir()
    shutil.copy(old_run / "checkpoints" / "step_4" / "trainer.json", stray)
    untouched = {k: v for k, v in hashes(old_run).items() if k.startswith("checkpoints/step_900/")}
    result = run_trainer(config, old_run, 1, "--train.steps=6", "--checkpoint.every=1", "--checkpoint.keep=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {old_run}/checkpoints/step_4" in result.stdout
    assert checkpoint_names(old_run) == ["step_6", "step_900"]
    assert json.loads((old_run / "checkpoints" / "step_6" / "trainer.json").read_text())["step"] == 6
    assert {k: v for k, v in hashes(old_run).items() if k in untouched} == untouched


def test_a_folder_where_the_run_would_save_stops_it(config, old_run):
    stray = old_run / "checkpoints" / "step_5"
    stray.mkdir()
    shutil.copy(old_run / "checkpoints" / "step_4" / "trainer.json", stray)
    assert_refused_and_untouched(config, old_run, ["--train.steps=6", "--checkpoint.every=1"],
                                 f"{stray} is in the way: this run saves its step-5 checkpoint there")


def test_a_run_folder_given_to_resume_names_its_newest_checkpoint(config, old_run):
    assert_refused_and_untouched(config, old_run, [f"--checkpoint.resume={old_run}"],
                                 f"checkpoint.resume = {old_run} is a run's folder: give one of its checkpoints, e.g. its newest, "
                                 f"{old_run}/checkpoints/step_4")


def test_a_folder_that_is_no_checkpoint_is_refused_for_resume(tmp_path):
    with pytest.raises(CheckpointError, match=f"^checkpoint.resume = {tmp_path}: not a complete checkpoint \\(no trainer.json or "
                                              "\\.metadata there\\); checkpoint.resume takes"):
        resume_candidates(tmp_path / "run", str(tmp_path))


def test_unreadable_checkpoints_stop_resume_auto_instead_of_starting_over(config, old_run):
    for shard in (old_run / "checkpoints").glob("step_*/*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    assert_refused_and_untouched(config, old_run, [], f"none of the 2 checkpoints in {old_run}/checkpoints can be read")
    step_4 = old_run / "checkpoints" / "step_4"
    assert_refused_and_untouched(config, old_run, [f"--checkpoint.resume={step_4}"],
                                 f"cannot read {step_4}: {step_4 / '__0_0.distcp'} is cut short (100 of ",
                                 "; resume from another checkpoint (checkpoint.resume = its folder, or \"auto\" for the newest that "
                                 "can be read)")


def test_a_run_dir_that_cannot_be_written_stops(config, tmp_path):
    (tmp_path / "file").write_text("")
    refused(run_trainer(config, tmp_path / "file" / "run", 1), f"run.dir = {tmp_path}/file/run: cannot write there (Not a directory)")


def test_a_checkpoints_folder_that_cannot_be_written_stops_before_training(config, tmp_path):
    (tmp_path / "checkpoints").write_text("")
    refused(run_trainer(config, tmp_path, 1), f"{tmp_path}/checkpoints: cannot write checkpoints there (Not a directory): make it "
                                              "writable")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_weights_the_gpu_has_no_room_for_are_said_with_their_size(monkeypatch):
    model = Mamba2LM(ModelConfig.from_preset("debug"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")

    monkeypatch.setattr(model, "to", out_of_memory)
    with pytest.raises(OutOfMemory, match=r"^the model's weights, 0.0 GiB on this rank, do not fit in the free memory of cuda:0: raise "
                                          r"parallel.tp"):
        moved_to(model, torch.device("cuda", 0))


def test_a_checkpoint_folder_that_cannot_be_made_is_a_checkpoint_error(tmp_path):
    """Where the folder goes away after start-up (a full disk, a file system remounted read-only): one line, no traceback."""
    cfg = Config(model=ModelConfig.from_preset("debug"))
    model = Mamba2LM(cfg.model)
    (tmp_path / "checkpoints").write_text("")
    with pytest.raises(CheckpointError, match=f"cannot save step 3: cannot create {tmp_path}/checkpoints/.step_3.tmp .*: free space or "
                                              f"make {tmp_path}/checkpoints writable, then resume"):
        start_checkpoint(tmp_path, cfg, model, engine_for(model), ParallelContext(), {"step": 3})


def test_nothing_is_left_to_do_past_train_steps(config, old_run):
    before = hashes(old_run)
    result = run_trainer(config, old_run, 1, "--train.steps=2")
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
    assert "nothing to do: the run is at step 4 and train.steps = 2" in result.stdout
    assert hashes(old_run) == before


def test_metrics_after_a_resume_describe_one_history(config, finished, old_run):
    """The step-4 checkpoint is lost after steps 3 and 4 were logged: the resumed run drops their records and logs
    them again, so the log equals the uninterrupted run's, its first records byte for byte."""
    shutil.rmtree(old_run / "checkpoints" / "step_4")
    first_two = (old_run / "metrics.jsonl").read_text().splitlines(keepends=True)[:2]
    result = run_trainer(config, old_run, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"dropped 2 lines after step 2 from {old_run}/metrics.jsonl" in result.stdout
    assert steps_logged(old_run) == [1, 2, 3, 4]
    assert (old_run / "metrics.jsonl").read_text().splitlines(keepends=True)[:2] == first_two
    assert_same_run(read_metrics(old_run), finished[1])


def test_a_run_resumed_from_another_folder_keeps_none_of_this_folders_records(config, old_run, tmp_path):
    """With checkpoint.overwrite, a run resumed from a checkpoint elsewhere replaces the folder's history, its log too."""
    elsewhere = Path(shutil.copytree(old_run / "checkpoints" / "step_2", tmp_path / "elsewhere" / "step_2"))
    result = run_trainer(config, old_run, 1, f"--checkpoint.resume={elsewhere}", "--checkpoint.overwrite=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"dropped 4 lines after step 0 from {old_run}/metrics.jsonl" in result.stdout
    assert steps_logged(old_run) == [3, 4]


def start(config: Path, run_dir: Path, nproc: int, *overrides: str, restarts: int = 0, env: dict | None = None) -> subprocess.Popen:
    """A long run in the background (under torchrun with `restarts` if nproc > 1), returned once it has logged two steps."""
    command = trainer_command(config, run_dir, nproc, "--train.eval_every=0", *overrides)
    if restarts:
        command[3:3] = ["--max-restarts", str(restarts)]  # after python -m megassm.torchrun
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**TRAINER_ENV, **(env or {})})
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.02)
    return job


def test_a_second_run_in_a_live_runs_folder_stops_and_a_dead_runs_lock_is_taken_over(config, tmp_path):
    run_dir = tmp_path / "run"
    first = start(config, run_dir, 1, "--train.steps=100000", "--checkpoint.every=-1")
    refused(run_trainer(config, run_dir, 1), f"run.dir = {run_dir} is in use by another run (pid {first.pid} on")
    first.kill()
    first.communicate()
    assert steps_logged(run_dir) == list(range(1, len(steps_logged(run_dir)) + 1))  # the second run wrote nothing
    result = run_trainer(config, run_dir, 1, "--train.steps=1", "--checkpoint.overwrite=true")  # another config: its log replaced
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: {run_dir}/run.lock was left by a run that is no longer running (pid {first.pid} on" in result.stdout
    assert not (run_dir / "run.lock").exists() and steps_logged(run_dir) == [1]


def test_without_flock_the_lock_follows_its_owners_processes(tmp_path, monkeypatch):
    """On a file system without flock: a lock naming a live process stops a run; one naming a dead one is taken over."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock, live = tmp_path / "run.lock", {**asdict(Owner.this_process()), "pid": os.getpid()}
    lock.write_text(json.dumps(live))
    with pytest.raises(RunDirError, match=re.escape(f"in use by another run (pid {os.getpid()} on {socket.gethostname()},")):
        RunLock(tmp_path, print).__enter__()
    assert json.loads(lock.read_text()) == live
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    lock.write_text(json.dumps({**live, "pid": gone.pid}))
    warnings = []
    with RunLock(tmp_path, warnings.append):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {lock} was left by a run that is no longer running (pid {gone.pid} on")
    assert not lock.exists()


def test_a_lock_left_on_another_node_is_taken_over_by_the_same_slurm_job_only(tmp_path, monkeypatch):
    """After a node failed, a requeued or restarted job's first process may run on another node: the lock its earlier
    process left there (unheld: its host is gone) is this job's own; another job's, from a host not checkable from
    here, stops the run."""
    lock = tmp_path / "run.lock"
    elsewhere = {**asdict(Owner.this_process()), "host": "node-that-failed", "pid": 1, "launcher_pid": 2, "slurm_job": "4242"}
    lock.write_text(json.dumps(elsewhere))
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(RunDirError, match="in use by another run .pid 1 on node-that-failed, launched by pid 2,"):
        RunLock(tmp_path, print).__enter__()
    assert json.loads(lock.read_text()) == elsewhere
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    said = []
    with RunLock(tmp_path, said.append):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
    assert said == [] and not lock.exists()


def test_a_lock_still_held_for_this_slurm_jobs_run_before_its_requeue_is_taken_over(tmp_path, monkeypatch):
    """NFS may keep a dead node's flock a while: held for this Slurm job before Slurm requeued it, the lock is taken
    over; held for the same job not requeued since (maybe alive), or for another job, the run stops."""
    lock = tmp_path / "run.lock"
    before = {**asdict(Owner.this_process()), "host": "node-that-failed", "pid": 1, "launcher_pid": 2, "slurm_job": "4242",
              "slurm_restart": 0}
    lock.write_text(json.dumps(before))
    held = os.open(lock, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the file server still holds it for the dead node
    try:
        for job, restart in (("4242", "0"), ("4243", "1")):
            monkeypatch.setenv("SLURM_JOB_ID", job)
            monkeypatch.setenv("SLURM_RESTART_COUNT", restart)
            with pytest.raises(RunDirError, match="in use by another run .pid 1 on node-that-failed"):
                RunLock(tmp_path, print).__enter__()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        said = []
        with RunLock(tmp_path, said.append):
            assert json.loads(lock.read_text())["host"] == socket.gethostname()
        assert len(said) == 1 and "still locked for this Slurm job's run before its requeue" in said[0] and not lock.exists()
    finally:
        os.close(held)


def test_workers_die_with_a_killed_torchrun(config, tmp_path):
    """torchrun starts each worker in its own session: kill -9 of torchrun alone must still end them."""
    job = start(config, tmp_path / "run", 2, "--parallel.cp=2", "--train.steps=100000", "--checkpoint.every=-1")
    workers = [p for p in psutil.Process(job.pid).children(recursive=True) if "megassm.train" in " ".join(p.cmdline())]
    assert len(workers) == 2
    job.kill()
    job.communicate()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_a_worker_whose_launcher_is_gone_exits_without_prctl(tmp_path):
    """The watch of the parent used where PR_SET_PDEATHSIG does not exist."""
    child = ("import sys; from megassm.stopping import exit_when_orphaned; print('watching', flush=True); "
             "exit_when_orphaned(int(sys.argv[1]), 0.05)")
    parent = ("import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', sys.argv[1], str(os.getpid())]); "
              "print(child.pid, flush=True); time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", parent, child], stdout=subprocess.PIPE, text=True, env=TRAINER_ENV)
    worker = psutil.Process(int(launcher.stdout.readline()))
    assert launcher.stdout.readline() == "watching\n"
    time.sleep(0.5)
    assert worker.is_running()  # watching while its parent lives
    launcher.kill()
    launcher.wait()
    worker.wait(timeout=10)  # gone, or TimeoutExpired


def stopped_by(signum: signal.Signals, config: Path, run_dir: Path) -> str:
    """Signal a run mid-way: the step in progress ends and its checkpoint is saved (none would be before the last
    step); returns the command of the one line that says where the run stopped and how to resume."""
    job = start(config, run_dir, 1, "--train.steps=16", "--checkpoint.every=0")
    job.send_signal(signum)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 128 + signum, stderr[-3000:]
    step = steps_logged(run_dir)[-1]
    assert 2 <= step < 16 and checkpoint_names(run_dir) == [f"step_{step}"]
    command = f"python -m megassm.train --config {config} --run.dir={run_dir} --train.eval_every=0 --train.steps=16 --checkpoint.every=0"
    saved = f"saved as {run_dir}/checkpoints/step_{step}"
    line = f"megassm-train: stopped by {signum.name} after step {step} of 16, {saved}; resume with: {command}"
    assert stderr.strip().splitlines() == [line]
    return command


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(config, tmp_path):
    stopped_by(signal.SIGINT, config, tmp_path / "run")


def as_from_a_terminal() -> None:
    """A child's SIGINT as a shell gives it: handled by default and not blocked, whatever the test process's is."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_torch_is_imported_is_one_line(config, tmp_path):
    """Ctrl-C in an entry point's first seconds, before any code of its own runs (import torch takes them). The exit
    status is 130, or the shell's SIGINT (once in some 60 tries)."""
    trainer = subprocess.Popen([sys.executable, "-m", "megassm.train", "--config", str(config), f"--run.dir={tmp_path}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    time.sleep(0.2)
    trainer.send_signal(signal.SIGINT)
    _, stderr = trainer.communicate()
    assert trainer.returncode in (128 + signal.SIGINT, -signal.SIGINT) and stderr == f"megassm-train: {STOPPED_WHILE_STARTING}\n", stderr


@pytest.mark.parametrize("argv, quiet", [(["python", "-m", "megassm.train", "--config", "x"], True),
                                         (["python", "-m", "megassm.torchrun", "-m", "megassm.train"], True),
                                         (["python", "/venv/bin/megassm-train", "--config", "x"], True),
                                         (["python", "my_script.py", "-m", "megassm.train"], False),
                                         (["python", "-m", "megassm.data.diagnose"], False)])
def test_only_the_entry_points_quiet_an_interrupt(argv, quiet, monkeypatch):
    """Python sets sys.argv[0] to "-m" while it imports the package of the module it runs. (What the quieting does:
    the test above.)"""
    monkeypatch.setattr(sys, "orig_argv", argv)
    monkeypatch.setattr(sys, "argv", ["-m" if argv[1] == "-m" else argv[1], *argv[2:]])
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    quiet_interrupt_while_importing()
    assert (sys.excepthook is not sys.__excepthook__) == quiet
    imports_done()  # the entry point's own code handles Ctrl-C from there: a later one is not said to come while starting
    assert sys.excepthook is sys.__excepthook__


def test_a_closed_terminal_saves_a_checkpoint(config, tmp_path):
    stopped_by(signal.SIGHUP, config, tmp_path / "run")


def test_nohup_keeps_ignoring_sighup():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopSignals(lambda signum: ""):
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_preemption_saves_a_checkpoint_and_the_printed_command_ends_the_run(config, tmp_path):
    run_dir = tmp_path / "run"
    command = shlex.split(stopped_by(signal.SIGTERM, config, run_dir))
    step = steps_logged(run_dir)[-1]
    result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=TRAINER_ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{step}" in result.stdout and steps_logged(run_dir) == list(range(1, 17))


def test_the_resume_command_repeats_the_launch_script(monkeypatch):
    """Launched by launch/torchrun.sh (which names itself and its variables in LAUNCH_ENV), a stop's line gives that
    command, with the trainer's arguments and the checkpoint where checkpoint.resume would not find it."""
    from types import SimpleNamespace

    trainer = SimpleNamespace(command=["--config", "my run.toml"], history=[Path("runs/x/checkpoints/step_8")],
                              cfg=SimpleNamespace(checkpoint=SimpleNamespace(resume="none")))
    monkeypatch.setenv(LAUNCH_ENV, "NPROC_PER_NODE=4 bash launch/torchrun.sh")
    assert Trainer.resume_command(trainer) == ("NPROC_PER_NODE=4 bash launch/torchrun.sh --config 'my run.toml' "
                                               "--checkpoint.resume=runs/x/checkpoints/step_8")
    monkeypatch.delenv(LAUNCH_ENV)
    assert Trainer.resume_command(trainer).startswith("python -m megassm.train --config 'my run.toml'")


def test_a_preempted_torchrun_job_saves_on_every_rank_and_says_so_once(config, tmp_path):
    """SIGTERM to torchrun and to its workers, as Slurm sends it to every process of a job step (each worker then has
    it twice: torchrun passes its own on): both finish the same step and save it together; rank 0 alone prints the
    line; torchrun exits as a process stopped by SIGTERM; the checkpoint resumes in one process."""
    run_dir = tmp_path / "run"
    job = start(config, run_dir, 2, "--parallel.cp=2", "--train.steps=16", "--checkpoint.every=0")
    for process in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    step = steps_logged(run_dir)[-1]
    assert stderr.count("megassm-train:") == 1 and "death signal" not in stderr, stderr[-3000:]  # torchrun's own line left out
    assert (f"megassm-train: stopped by SIGTERM after step {step} of 16, saved as {run_dir}/checkpoints/step_{step}; resume with: "
            "torchrun [the same options] -m megassm.train") in stderr
    assert 2 <= step < 16 and checkpoint_names(run_dir) == [f"step_{step}"]
    records = train(config, run_dir, 1, "--train.eval_every=0", "--train.steps=16", "--checkpoint.every=0")
    assert [r["step"] for r in records] == list(range(1, 17))


def workers(job: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(job.pid).children(recursive=True) if "megassm.train" in " ".join(p.cmdline())]


def test_workers_stopped_by_a_signal_are_not_restarted(config, tmp_path):
    """SIGTERM to the workers alone (a pod evicted, Ctrl-C in one node's terminal): they save and exit as asked, and
    torchrun, with restarts left, ends the run there rather than starting it again from that checkpoint."""
    run_dir = tmp_path / "run"
    job = start(config, run_dir, 2, "--parallel.cp=2", "--train.steps=100000", "--checkpoint.every=0", restarts=1)
    for worker in workers(job):
        worker.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "resumed from" not in stdout and len(checkpoint_names(run_dir)) == 1, stdout[-3000:]


def test_workers_killed_after_the_grace_period_are_reported(config, tmp_path):
    """torchrun kills the workers that have not stopped within TORCH_ELASTIC_SHUTDOWN_TIMEOUT of its SIGTERM (here 0 s):
    one line says so and that this stop's checkpoint may be missing; the exit status is a killed process's."""
    job = start(config, tmp_path / "run", 2, "--parallel.cp=2", "--train.steps=100000", env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "0"})
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 128 + signal.SIGKILL, stderr[-3000:]
    assert "megassm-torchrun: a worker did not stop within 0 s of SIGTERM and was killed: this stop's checkpoint may be missing" in stderr


def wait_for_handlers():
    for _ in range(100):  # Python runs a signal's handler between bytecodes of the main thread
        time.sleep(0.001)


def test_a_second_ctrl_c_stops_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped, match="stopped at once by 2") as stop:
        with StopSignals(lambda signum: f"stopped at once by {signum}") as signals:
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_handlers()
            assert signals.requested(torch.device("cpu")) == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_handlers()
    assert stop.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is previous


def test_a_sigterm_after_ctrl_c_stops_at_once():
    """torchrun passes a second Ctrl-C on to its workers as SIGTERM: said as the Ctrl-C it was."""
    with pytest.raises(Stopped, match="stopped at once by 2") as stop:
        with StopSignals(lambda signum: f"stopped at once by {signum}"):
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_handlers()
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_handlers()
    assert stop.value.exit_code == 130


def test_a_repeated_sigterm_still_lets_the_run_save():
    """One stop of a scheduler brings SIGTERM more than once (to every process, and from torchrun): the run still ends
    its step and saves; Ctrl-C after it stops at once."""
    with StopSignals(lambda signum: f"stopped at once by {signum}") as signals:
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for_handlers()
        assert signals.requested(torch.device("cpu")) == signal.SIGTERM
        with pytest.raises(Stopped, match="stopped at once by 2"):
            os.kill(os.getpid(), signal.SIGINT)
            wait_for_handlers()


def test_a_cpu_run_leaves_a_core_free_unless_told(monkeypatch):
    cores, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        limit_cpu_threads(torch.device("cpu"))
        assert torch.get_num_threads() == max(1, cores - 1)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)
        limit_cpu_threads(torch.device("cpu"))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_importing_megassm_chooses_expandable_segments_unless_the_user_did():
    """Set at import, before anything of megassm's start-up initializes CUDA (PyTorch reads it then, once)."""
    code = "import os, megassm; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    root = Path(__file__).resolve().parents[1]
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert chosen.stdout.strip() == "expandable_segments:True"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:512"
    kept = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert kept.stdout.strip() == "max_split_size_mb:512"


def test_training_on_cuda_takes_cublas_without_workspace_unless_the_user_sized_one(monkeypatch):
    """The trainer's choice (set before its first matmul, where PyTorch reads it); none on the CPU, none over the user's."""
    from megassm.train import use_cublas_without_workspace

    names = ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE")
    for name in names:  # recorded, so that teardown removes what the function sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    use_cublas_without_workspace(torch.device("cpu"))
    assert not any(name in os.environ for name in names)
    use_cublas_without_workspace(torch.device("cuda", 0))
    assert [os.environ[name] for name in names] == [":0:0", "0"]
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "1024")
    use_cublas_without_workspace(torch.device("cuda", 0))
    assert [os.environ[name] for name in names] == [":4096:8", "1024"]


def check_rank_0_decides() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert decided_by_first(lambda: [f"step_{8 - 4 * rank}"]) == ["step_8"]  # rank 1 sees an older listing

    def refuse() -> list:
        if rank == 0:
            raise IncompatibleCheckpoint("refused by rank 0")
        return []

    with pytest.raises(IncompatibleCheckpoint, match="refused by rank 0"):
        decided_by_first(refuse)


def test_the_checkpoint_to_resume_is_rank_0s_choice_on_every_rank():
    """Every rank resumes from the checkpoint rank 0 lists (a node's view of a shared filesystem can lag behind), and
    rank 0's refusal stops every rank with its message."""
    run_distributed(check_rank_0_decides, 2)


def check_read_once(path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from megassm import checkpoint
    from parallel import DDPEngine, init_parallel

    ctx = init_parallel(dp=2, backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(rank + 1)  # each rank's weights differ from the checkpoint's until loaded
    model = Mamba2LM(ModelConfig.from_preset("debug"), ctx)
    engine = DDPEngine(model, ctx, [{"params": list(model.parameters())}], lr=0.0)
    loads, real_load = [], dcp.load
    dcp.load = lambda *args, **kwargs: loads.append(1) or real_load(*args, **kwargs)
    checkpoint.OPTIMIZER_READ_BYTES = 3 * max(p.nbytes for p in model.parameters())  # the optimizer state in several batches
    assert load_checkpoint(path, model, engine, ctx)["step"] == 3
    assert len(loads) > 3 if rank == 0 else not loads  # read by the first rank of DP alone: the model, then each batch
    torch.manual_seed(0)
    saved = Mamba2LM(ModelConfig.from_preset("debug"))
    for (name, got), want in zip(model.named_parameters(), saved.parameters(), strict=True):
        assert torch.equal(got, want), name
    state = engine.state_dict()["state"]
    assert state and all(torch.equal(entry["exp_avg"], torch.full_like(entry["exp_avg"], 0.5)) for entry in state.values())


def test_the_optimizer_state_is_read_a_batch_of_parameters_at_a_time(tmp_path, monkeypatch):
    """Resuming reads the optimizer state in batches of at most OPTIMIZER_READ_BYTES of logical tensors (ZeRO places
    a slice of each parameter's state: a whole copy beside it would not fit for a large model), and each parameter
    gets the state it had when saved."""
    import torch.distributed.checkpoint as dcp

    from megassm import checkpoint

    torch.manual_seed(0)
    model = Mamba2LM(ModelConfig.from_preset("debug"))
    engine = engine_for(model)
    saved = {p: {"step": torch.tensor(3.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)} for p in model.parameters()}
    engine.optimizer.state.update(saved)
    path = save_checkpoint(tmp_path, Config(model=model.cfg), model, engine, ParallelContext(),
                           {"step": 3, "samples": 24, "skipped_steps": 0})
    limit = 3 * max(p.nbytes for p in model.parameters())  # room for one parameter's two moments, never for all
    monkeypatch.setattr(checkpoint, "OPTIMIZER_READ_BYTES", limit)
    batches, real_load = [], dcp.load

    def load(state_dict, **kwargs):
        if "model" not in state_dict:
            batches.append(sum(v.nbytes for entry in state_dict["optimizer"]["state"].values() for k, v in entry.items() if k != "step"))
        return real_load(state_dict, **kwargs)

    monkeypatch.setattr(dcp, "load", load)
    torch.manual_seed(1)
    resumed = Mamba2LM(ModelConfig.from_preset("debug"))
    resumed_engine = engine_for(resumed)
    load_checkpoint(path, resumed, resumed_engine, ParallelContext())
    assert len(batches) > 2 and max(batches) <= limit, batches
    assert sum(batches) == sum(2 * p.nbytes for p in model.parameters())  # each parameter's state read once
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        for key, value in saved[p].items():
            assert torch.equal(resumed_engine.optimizer.state[q][key], value), f"{name} {key}"


def test_a_checkpoint_is_read_once_per_tp_rank_and_broadcast_over_data_parallelism(tmp_path):
    """Every DP rank holds the same weights and optimizer state: the first reads them, the others receive them."""
    torch.manual_seed(0)
    model = Mamba2LM(ModelConfig.from_preset("debug"))
    engine = engine_for(model)
    engine.optimizer.state.update({p: {"step": torch.tensor(3.0), "exp_avg": torch.full_like(p, 0.5), "exp_avg_sq": torch.ones_like(p)}
                                   for p in model.parameters()})
    path = save_checkpoint(tmp_path, Config(model=model.cfg), model, engine, ParallelContext(),
                           {"step": 3, "samples": 24, "skipped_steps": 0})
    run_distributed(check_read_once, 2, path)

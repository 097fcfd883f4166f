"""The trainer: `python -m megassm.train --config configs/X.toml [--section.key=value ...]`, alone or
under torchrun (one process per GPU; CPU processes with gloo where there is none).

One optimizer step: every rank fetches its micro batches of the step (samples fixed by the number
of samples consumed before it, the one integer a checkpoint needs, so the global batch is the same
whatever the layout, and stays in order if global_batch changes on resume), the global count of target
tokens is summed once, and each micro batch's loss is divided by it, so the gradient summed over
DP x CP ranks is the mean over the global batch. Everything that can be wrong with the config or the
data is reported in one line before a model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from megassm import host_memory, job_store
from megassm.auto_choices import (check_kernel_limits, check_weights_fit, cuda_graph_groups, cuda_graphs_choice, memory_choices,
                                  out_of_memory_advice)
from megassm.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    DamagedCheckpoint,
    check_compatible,
    checkpoint_dir,
    checkpoint_step,
    checkpoints_folder,
    checkpoints_in,
    decided_by_first,
    load_checkpoint,
    resume_candidates,
    start_checkpoint,
    step_folders,
    tokenizer_vocabulary,
    unfinished_saves,
)
from megassm.checkpoint_writer import HOST_MEMORY_SHARE, BackgroundWrite, HostCopies
from megassm.config import Config, ConfigError, load_config, pick_device, write_config
from megassm.data import DataError, SampleLoader, TokenStream, load_tokenizer, rank_samples
from megassm.data.mixture import MIX_BLOCK, MixedLoader, Mixture, block_counts
from megassm.data.shards import META_FILE, VERIFIED_FILE, folder_sha256
from megassm.errors import STOPPED_WHILE_STARTING, TRAINER_PROGRAM, USER_ERROR_EXIT, UserError, imports_done
from megassm.host_scalar import HostScalar
from megassm.metrics import (
    METRICS_FILE,
    MetricsLogger,
    StepTimer,
    drop_records_after,
    logical_param_count,
    memory_gib,
    model_flops_per_token,
    peak_flops,
    throughput,
)
from megassm.model import (Mamba2LM, apply_activation_checkpointing, apply_cuda_graphs, apply_kernels, apply_loss_chunking,
                           apply_ssd_state_keeping)
from megassm.ops import resolve_backend
from megassm.optim import learning_rate, param_groups, schedule_warning
from megassm.pretrained import PretrainedError, detect_format, load_pretrained
from megassm.run_dir import (Owner, RunLock, check_checkpoints_writable, check_log_not_replaced, checkpoints_to_replace, in_run_dir,
                             launched_by_torchrun, own_newest_checkpoint)
from megassm.stopping import FailedElsewhere, StopSignals, Stopped, die_with_launcher
from parallel import IGNORE_INDEX, DDPEngine, ParallelContext, init_parallel, local_piece, param_roles
from parallel.collectives import all_reduce
from parallel.context import group_size
from parallel.data_parallel import DataParallelEngine


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says what to try."""


class OutOfMemory(TrainingError):
    """A training step ran out of GPU memory on this rank (said by the rank it happened on, not only rank 0)."""


class MissingAtStart(TrainingError):
    """Ranks that never reached a step of the start-up (they died, or hang); said by each node's first process where
    rank 0, which says the others' lines, is among them."""

    def __init__(self, missing: job_store.NotReported):
        super().__init__(f"ranks {', '.join(map(str, missing.ranks))} did not reach the start-up's step {missing.key!r} within "
                         f"{START_TIMEOUT.seconds // 60} minutes: they stopped or hang, their nodes' output says why")
        self.without_rank_0 = 0 in missing.ranks


def global_sum(x: Tensor, ctx: ParallelContext) -> Tensor:
    """Sum over the ranks that hold different tokens (DP x CP)."""
    return x if group_size(ctx.dp_cp_group) == 1 else all_reduce(x, ctx.dp_cp_group)


def open_data(cfg: Config) -> list[TokenStream]:
    """data.path's prepared folders, checked against the model and each other before anything is built."""
    streams = [_open_folder(folder, cfg) for folder in cfg.data.folders()]
    first, seen = streams[0], {}
    tokenizer = folder_sha256(first.tokenizer_path) if len(streams) > 1 else None
    for stream in streams:
        if stream is not first and folder_sha256(stream.tokenizer_path) != tokenizer:
            raise ConfigError(f"the folders of data.path were prepared with different tokenizers: {first.tokenizer_path} and "
                              f"{stream.tokenizer_path}; a mixture's folders need one tokenizer (prepare them again with one)")
        shards = tuple(shard.sha256 for shard in stream.meta.shards)
        if shards in seen:
            raise ConfigError(f"data.path's folders {seen[shards]} and {stream.path} hold the same tokens (a copy): name it once, "
                              "with the weight of both")
        seen[shards] = stream.path
    return streams


def _open_folder(folder: str, cfg: Config) -> TokenStream:
    """One prepared folder, its tokenizer checked against its description and the model."""
    stream = TokenStream(folder)
    if stream.meta.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer of {folder} (data.path) has {stream.meta.vocab_size} tokens, more than "
                          f"model.vocab_size = {cfg.model.vocab_size}: raise model.vocab_size or use a smaller tokenizer")
    meta_file = Path(folder) / META_FILE
    if not stream.tokenizer_path.exists():
        raise ConfigError(f"the tokenizer {stream.tokenizer_path} named in {meta_file} is missing: re-run tools/prepare_data.py")
    try:
        tokens = load_tokenizer(stream.tokenizer_path).vocab_size
    except (OSError, ValueError) as error:  # a damaged copy: the data's checksums do not cover it
        raise DataError(f"the tokenizer of {meta_file} cannot be read: {error}") from None
    if tokens != stream.meta.vocab_size:  # ids past the model's embedding
        raise DataError(f"{meta_file} says vocab_size = {stream.meta.vocab_size}, but its tokenizer {stream.tokenizer_path} has {tokens} "
                        "tokens: re-run tools/prepare_data.py")
    return stream


def sample_order(streams: list[TokenStream], cfg: Config) -> str:
    """What the order of the samples depends on (the data's contents and shares, data.seq_len, run.seed), as a digest a
    checkpoint keeps: a run resumed from it goes on with the samples it has not seen where the digest is the same."""
    what = [[[shard.sha256 for shard in stream.meta.shards], stream.meta.doc_starts_sha256, stream.meta.val_tokens] for stream in streams]
    if len(streams) == 1:
        what = what[0]
    else:  # the samples each block of the mixture takes from each folder: equal weights written otherwise are equal
        what.append(block_counts(list(cfg.data.folders().values()), MIX_BLOCK).tolist())
    return hashlib.sha256(json.dumps([*what, cfg.data.seq_len, cfg.run.seed]).encode()).hexdigest()[:16]


def folder_names(folders: list[str]) -> list[str]:
    """How lines and metrics name data.path's folders: as many of their last parts as tell them apart."""
    parts = [Path(folder).relative_to(Path(folder).anchor).parts for folder in folders]
    for count in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-count:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return folders


DATA_VERIFY_TIMEOUT = datetime.timedelta(hours=6)  # the ranks' wait for each other's share of the data verification
START_TIMEOUT = datetime.timedelta(minutes=10)  # the ranks' wait for each other's view of the data and run.dir at start-up
# How long a process ending on an error waits for the checkpoint write in flight.
ABANDONED_WRITE_WAIT = datetime.timedelta(minutes=2)
# How long a rank that met a mistake before the ranks joined, and leaves saying it to another rank, waits for torchrun to
# stop it (once that rank has said it) before it says it itself: the mistake was then this rank's alone.
SAY_ALONE_AFTER = datetime.timedelta(seconds=20)
LAUNCH_ENV = "MEGASSM_LAUNCH"  # the launch command a resume repeats, as launch/torchrun.sh and launch/slurm.sbatch set it


T = TypeVar("T")


def decided_at_start(key: str, start: Callable[[], T]) -> T:
    """job_store.on_every_rank for a step of the start-up; ranks that never reached it said in one line, as a failure
    torchrun may restart (MissingAtStart)."""
    try:
        return job_store.on_every_rank(key, start, START_TIMEOUT)
    except job_store.NotReported as missing:
        raise MissingAtStart(missing) from None


def verify_data(stream: TokenStream, say: Callable[[str], None]) -> None:
    """The data folder's files against their sha256, those not verified since they last changed (rank 0's list), each
    rank reading its share; a mismatch found by any rank stops every rank with its line."""
    if not dist.is_initialized():
        recorded = stream.verify()
    else:
        recorded = _verify_shared(stream)
    if not recorded:
        say(f"warning: cannot write {stream.path / VERIFIED_FILE}: every start reads the whole data folder again to "
            "verify it; once it has passed, data.verify = false skips that")


def _verify_shared(stream: TokenStream) -> bool:
    """verify_data over the ranks; whether rank 0 could record what matched."""
    files, rank, world = decided_by_first(stream.unverified), dist.get_rank(), dist.get_world_size()
    try:
        found = (stream.check(files[rank::world]), None)
    except DataError as error:
        found = ({}, error)
    matched = {}

    def first_error(everyone: list) -> None:
        errors = [error for _, error in everyone if error is not None]
        if errors:
            raise errors[0]
        matched.update((name, stamp) for stamps, _ in everyone for name, stamp in stamps.items())

    job_store.decided("megassm/verify_data", found, first_error, DATA_VERIFY_TIMEOUT)
    return rank != 0 or stream.record_verified(matched)


def smallest_over_ranks(value: int, device: torch.device) -> int:
    """The smallest of the job's ranks' `value` (the value itself in one process)."""
    if not dist.is_initialized():
        return value
    smallest = all_reduce(torch.tensor([value], dtype=torch.int64, device=device), dist.group.WORLD, op=dist.ReduceOp.MIN)
    return int(smallest.item())


def host_memory_share(device: torch.device) -> int | None:
    """The host memory left to each process of its node (host_memory.available() over LOCAL_WORLD_SIZE), the smallest
    over the job, so that every rank decides alike; None where no node can tell."""
    unknown = 2**62
    left = host_memory.available()
    share = smallest_over_ranks(unknown if left is None else left // int(os.environ.get("LOCAL_WORLD_SIZE", 1)), device)
    return None if share == unknown else share


def build_model(cfg: Config, ctx: ParallelContext, cuda_graphs: bool, keep_ssd_states: bool, recomputed_blocks: int) -> Mamba2LM:
    """[model]'s architecture, run as [kernels] and [train] say."""
    model = Mamba2LM(cfg.model, ctx)
    apply_kernels(model, cfg.kernels.backend, cfg.kernels.compile, cfg.kernels.ssd)
    apply_loss_chunking(model, cfg.train.loss_chunk_tokens)
    if recomputed_blocks:
        apply_activation_checkpointing(model, recomputed_blocks)
    if keep_ssd_states:
        apply_ssd_state_keeping(model)
    if cuda_graphs:
        apply_cuda_graphs(model, cuda_graph_groups(ctx, cfg.parallel.engine, cfg.parallel.zero_stage))
    return model


def moved_to(model: Mamba2LM, device: torch.device) -> Mamba2LM:
    """The model on `device`, or OutOfMemory naming its weights' size and the levers where the GPU lacks room for them."""
    try:
        return model.to(device)
    except torch.OutOfMemoryError:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        raise OutOfMemory(f"the model's weights, {weights / 2**30:.1f} GiB on this rank, do not fit in the free memory of {device}: "
                          "raise parallel.tp, or check the [model] sizes (and what else runs on the GPU)") from None


def changed_keys(theirs: Config, ours: Config, keys: list[tuple[str, str]]) -> list[str]:
    """"section.key old -> new" for each of `keys` whose value differs."""
    return [f"{section}.{key} {getattr(getattr(theirs, section), key)} -> {getattr(getattr(ours, section), key)}"
            for section, key in keys if getattr(getattr(theirs, section), key) != getattr(getattr(ours, section), key)]


def schedule_change(theirs: Config, ours: Config, step: int, checkpoint: Path) -> str | None:
    """How resuming from `checkpoint`, written after `step` by a run configured as `theirs`, on `ours` changes the
    learning rate's schedule; None where it does not."""
    changed = changed_keys(theirs, ours, [("train", "steps"), ("optim", "warmup_steps"), ("optim", "lr"), ("optim", "min_lr"),
                                               ("optim", "decay"), ("optim", "decay_fraction")])
    if not changed:
        return None
    now, before = learning_rate(step, ours.optim, ours.train.steps), learning_rate(step, theirs.optim, theirs.train.steps)
    differs = f"the learning-rate schedule differs from the one {checkpoint} was trained with ({', '.join(changed)})"
    if math.isclose(now, before, rel_tol=1e-6):
        return f"{differs}: step {step + 1} runs at {now:.2e} as it would have, and the rate follows this run's schedule from there"
    return f"warning: {differs}: step {step + 1} runs at {now:.2e} where that run's would have run at {before:.2e}"


def adamw_change(theirs: Config, ours: Config, step: int, checkpoint: Path) -> str | None:
    """AdamW's settings of `ours` that differ from those of `theirs`, the run that wrote `checkpoint` after `step`
    (the configured ones apply: the checkpoint gives the moments); None where none does."""
    changed = changed_keys(theirs, ours, [("optim", "weight_decay"), ("optim", "beta1"), ("optim", "beta2"), ("optim", "eps")])
    if changed:
        return (f"AdamW's settings differ from those {checkpoint} was trained with ({', '.join(changed)}): this run's apply from "
                f"step {step + 1} on")
    return None


def limit_cpu_threads(device: torch.device) -> None:
    """One thread per core but one, for a run on CPU whose threads nobody set (torchrun sets OMP_NUM_THREADS=1 for
    several processes). OpenMP's threads wait for each other at every op, so when another process holds one of
    them off its core all of them stall: on a 2-core machine shared with anything, 2 threads ran 5-8x slower than 1."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores - 1))


def use_cublas_without_workspace(device: torch.device) -> None:
    """Training on CUDA: cuBLAS's matmuls without a workspace, unless the user sized one (CUBLAS_WORKSPACE_CONFIG or
    CUBLASLT_WORKSPACE_SIZE; PyTorch reads them at the process's first matmul, which comes later). Why: with one,
    cuBLAS 13 runs the mixers' bf16 matmuls on an H200 as kernels that need part of it zeroed first, a memset before
    each (192 per 780m step) with the GPU idle around it, also inside a CUDA graph (~1.5 ms of a 780m step); without
    one, kernels of the same tiles that need none: 0.4-1.6% more tokens/s (bench/RESULTS.md, run 19). Only the
    trainer: generation's small matmuls may want a workspace."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")


def quiet_cublas_context_warning() -> None:
    """autograd's CUDA thread runs its first matmul before that thread has a current CUDA context; cuBLAS then uses
    the device's primary context, as the rest of the process does, and torch warns of it in every run (a UserWarning
    with a line of parallel/linear.py that the user can do nothing about)."""
    warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")


def join_processes(cfg: Config, device: torch.device) -> ParallelContext:
    """This process's place in the layout: the process groups of tp x cp x dp under torchrun (NCCL on CUDA, gloo on
    CPU), a single process otherwise. DeepSpeed's engine needs torchrun's environment even for one process."""
    launched = "RANK" in os.environ  # by torchrun, also for one process
    if cfg.parallel.engine == "deepspeed" and not launched:
        raise ConfigError("parallel.engine = 'deepspeed' needs torchrun, also for one process: "
                          "NPROC_PER_NODE=1 bash launch/torchrun.sh --config ...")
    if not launched:
        return ParallelContext()
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        return init_parallel(cfg.parallel.tp, cfg.parallel.cp, cfg.parallel.dp, cfg.parallel.sequence_parallel, backend)
    except ValueError as error:  # how the job was launched (the layout itself was checked with the config)
        raise ConfigError(str(error)) from None


def make_engine(cfg: Config, model: Mamba2LM, ctx: ParallelContext) -> DataParallelEngine:
    """The data-parallel engine named by parallel.engine, owning the AdamW optimizer."""
    optim = cfg.optim
    args = (model, ctx, param_groups(model, optim.weight_decay), optim.lr, (optim.beta1, optim.beta2), optim.eps)
    if cfg.parallel.engine == "deepspeed":
        from parallel.deepspeed_engine import DeepSpeedEngine  # imported only when used: it is slow to import

        return DeepSpeedEngine(*args, zero_stage=cfg.parallel.zero_stage, accumulation_steps=cfg.accumulation_steps,
                               graphed=model.cuda_graphs)
    return DDPEngine(*args, zero_in_place=model.cuda_graphs and cfg.accumulation_steps > 1, graphed=model.cuda_graphs)


class QueuedStep(NamedTuple):
    """An optimizer step queued on the device."""

    done: int  # steps done once it is
    loss_sum: Tensor  # this rank's; reduced over ranks only when logged
    targets: Tensor  # the global count of target tokens
    grad_norm: HostScalar  # before clipping
    lr: float


class Trainer:
    """One training run of a Config: its processes joined, model, engine, data and checkpoints set up by the constructor
    (every user mistake said before the first step), then run() trains, validates, logs and saves until train.steps
    or a stop."""

    def __init__(self, cfg: Config, command: list[str] | None = None, hold: Callable[[RunLock], object] | None = None):
        """hold: takes run.dir's lock on rank 0 (an ExitStack's enter_context, letting go when the process is done with
        the run); None for tools that run a trainer without a run folder of their own."""
        self.cfg = cfg
        self.command = sys.argv[1:] if command is None else command  # the trainer's arguments, to say how to resume
        self.device = pick_device(cfg.train.device)
        limit_cpu_threads(self.device)
        use_cublas_without_workspace(self.device)
        quiet_cublas_context_warning()
        self.is_writer = int(os.environ.get("RANK", 0)) == 0
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.run_dir = Path(cfg.run.dir)
        self.ctx = join_processes(cfg, self.device)
        self.data_names, self.data_shares = folder_names(list(cfg.data.folders())), list(cfg.data.folders().values())
        # Each node's own view (its copy of the data, the lock of a shared run.dir), decided together once joined.
        streams, (self.train_data, self.val_data) = decided_at_start("megassm/open_data", self.open_samples)
        if hold is not None:
            decided_at_start("megassm/run_lock", lambda: self.is_writer and hold(RunLock(self.run_dir, say=print)))
        check_weights_fit(cfg, host_memory_share(self.device))
        self.vocabulary = tokenizer_vocabulary(streams[0].tokenizer_path, streams[0].meta.vocab_size)
        self.attempts = attempts()
        checkpoints, replaced, self.resume_from = decided_by_first(self.starting_point)
        if cfg.data.verify:  # after the checks of run.dir and the checkpoints: hashing a large corpus takes a while
            for stream in streams:
                verify_data(stream, self.say)
        torch.manual_seed(cfg.run.seed)  # the same logical initial weights on every rank and layout
        self.model = self.model_for_device()
        if not checkpoints and cfg.checkpoint.init_from:
            self.init_weights_from(cfg.checkpoint.init_from)
        self.engine = make_engine(cfg, self.model, self.ctx)
        self.say_data()
        if warning := schedule_warning(cfg.optim, cfg.train.steps):
            self.say(warning)
        self.sample_order = sample_order(streams, cfg)
        self.state = {"step": 0, "samples": 0, "skipped_steps": 0, "sample_order": self.sample_order}
        self.consecutive_skips = 0  # steps in a row whose update was skipped (read_norm)
        self.save_postponed = False  # a checkpoint was due during such steps: written after the next step that updates
        self.history: list[Path] = []  # the checkpoints of run.dir's history, oldest first: the only ones rotation deletes
        self.saving: BackgroundWrite | None = None  # the checkpoint being written, of step self.saving_step
        self.saving_step = 0
        self.saving_rotates = True  # whether the checkpoint being written deletes those beyond checkpoint.keep once complete
        self.save_failure: CheckpointError | None = None  # a checkpoint that could not be written stops the run
        self.host_copies = HostCopies()  # where each checkpoint's state is copied before it is written
        self.said_short_of_host_memory = False
        self.resume(checkpoints)
        self.state["attempts"] = self.attempts  # in each checkpoint: a restart of this launch resumes from it (own_newest_checkpoint)
        self.take_over(replaced)
        n_params = logical_param_count(cfg.model)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.data.seq_len, n_params)
        self.peak = peak_flops(self.device, cfg.train.peak_tflops)
        self.say(self.start_line(n_params))

    def model_for_device(self) -> Mamba2LM:
        """The model on this device with the trainer's choices for it: the kernels, whether the blocks run as CUDA
        graphs, how many blocks are recomputed in the backward and whether the SSD's states are kept for it (each said
        in the start line; the memory levers named again if the GPU runs out of memory)."""
        cfg = self.cfg
        self.backend = resolve_backend(cfg.kernels.backend, self.device)
        graphs, self.graphs_note = cuda_graphs_choice(cfg, self.device)
        # The smallest GPU of the job: every rank makes the same choices, since a recomputed block repeats its collectives.
        device_memory = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else 0
        memory = memory_choices(cfg, self.backend, smallest_over_ranks(device_memory, self.device), graphs)
        self.recompute_note = memory.recompute_note
        ssd_note = ", ".join([f"SSD: {cfg.kernels.ssd}", *([memory.states_note] if memory.states_note else [])])
        self.kernels_note = f"triton kernels ({ssd_note})" if self.backend == "triton" else f"{self.backend} kernels"
        check_kernel_limits(cfg, self.backend)
        self.memory_levers = {"keep_ssd_states": memory.keep_ssd_states, "cuda_graphs": graphs,
                              "recomputed_blocks": memory.recomputed_blocks}
        return moved_to(build_model(cfg, self.ctx, graphs, memory.keep_ssd_states, memory.recomputed_blocks), self.device)

    def open_samples(self) -> tuple[list[TokenStream], tuple[MixedLoader, list[SampleLoader]]]:
        """data.path's folders, their training samples (a mixture where it names several) and, where the run validates,
        each folder's validation samples; each rank's piece of them."""
        cfg = self.cfg
        streams = open_data(cfg)
        loader = dict(seq_len=cfg.data.seq_len, seed=cfg.run.seed, cp=self.ctx.cp, cp_rank=self.ctx.cp_rank)
        train_data = MixedLoader([SampleLoader(stream, split="train", **loader) for stream in streams],
                                 Mixture(self.data_shares, cfg.run.seed))
        val_data = [SampleLoader(stream, split="val", **loader) for stream in streams] if cfg.train.eval_every else []
        return streams, (train_data, val_data)

    def say_data(self) -> None:
        """What the run's data needs a line for: a validation split that repeats samples, a mixture's shares."""
        cfg, several = self.cfg, len(self.data_names) > 1
        for name, val in zip(self.data_names, self.val_data):
            if cfg.train.eval_samples > val.num_windows:
                split = f"the validation split of {name}" if several else "the validation split"
                self.say(f"warning: train.eval_samples = {cfg.train.eval_samples}, but {split} holds "
                         f"{val.num_windows} samples of data.seq_len tokens: some count more than once; lower "
                         "train.eval_samples or prepare the data with a larger --val-fraction")
        if several:
            read = self.train_data.mixture.read_by(cfg.train.steps * cfg.data.global_batch)
            self.say("data: " + ", ".join(f"{name} {share:.1%} of the samples ({loader.num_windows:,} training samples, read "
                                          f"{count / loader.num_windows:.2f} times in train.steps)" for name, share, loader, count
                                          in zip(self.data_names, self.data_shares, self.train_data.loaders, read)))

    def start_line(self, n_params: int) -> str:
        """The run as started: size, layout, batch, precision and the trainer's choices."""
        cfg = self.cfg
        device = f"cpu ({torch.get_num_threads()} thread(s))" if self.device.type == "cpu" else self.device.type
        return (f"megassm: {n_params / 1e6:.1f}M parameters | tp {self.ctx.tp} x cp {self.ctx.cp} x dp {self.ctx.dp} on {device} | "
                f"{cfg.data.global_batch} x {cfg.data.seq_len} tokens per step in {cfg.accumulation_steps} micro batches per rank | "
                f"{cfg.train.precision} | {self.kernels_note} | {self.graphs_note} | {self.recompute_note} | "
                f"engine {cfg.parallel.engine} | run dir {self.run_dir}")

    def starting_point(self) -> tuple[list[Path], list[Path], str]:
        """The checkpoints to resume from, in order, those of run.dir this run replaces, and checkpoint.resume as it
        applies (collectively decided by rank 0); a mistake in either, in checkpoint.init_from's folder or about run.dir's
        log raised first. A run restarted by torchrun or requeued by Slurm goes on from its own newest checkpoint,
        whatever checkpoint.resume says (its command line is the first start's)."""
        cfg, checkpoint = self.cfg, self.cfg.checkpoint
        if checkpoint.resume != "auto" and (own := own_newest_checkpoint(self.run_dir, self.attempts)):
            self.say(f"{own} was written by this launch (restarted or requeued): going on from there, not as "
                     f"checkpoint.resume = {checkpoint.resume!r} says")
            checkpoint = dataclasses.replace(checkpoint, resume="auto")
        checkpoints = resume_candidates(self.run_dir, checkpoint.resume)
        replaced = checkpoints_to_replace(self.run_dir, checkpoint)
        check_log_not_replaced(self.run_dir, cfg, checkpoints)
        if checkpoint.every >= 0:
            check_checkpoints_writable(self.run_dir)
        if not checkpoints and cfg.checkpoint.init_from:
            try:
                detect_format(cfg.checkpoint.init_from)
            except PretrainedError as error:
                raise PretrainedError(f"checkpoint.init_from: {error}") from None
        return checkpoints, replaced, checkpoint.resume

    def say(self, line: str) -> None:
        if self.is_writer:
            print(line, flush=True)

    def resume(self, checkpoints: list[Path]) -> None:
        """Load the first of `checkpoints` that can be read; with checkpoint.resume = "auto" a damaged one is skipped
        with a warning, but a checkpoint of another model or tokenizer stops the run."""
        for path in checkpoints:
            try:
                check_compatible(path, self.cfg.model, self.vocabulary)
                self.state = load_checkpoint(path, self.model, self.engine, self.ctx)
            except DamagedCheckpoint as error:
                if self.resume_from != "auto":
                    raise DamagedCheckpoint(f"{error}; resume from another checkpoint (checkpoint.resume = its folder, or "
                                            "\"auto\" for the newest that can be read)") from None
                self.say(f"warning: skipping damaged checkpoint {path}: {error}")
                continue
            if in_run_dir(path, self.run_dir):  # rotation goes on over the folder's history, up to this checkpoint
                self.history = [p for p in checkpoints_in(self.run_dir) if checkpoint_step(p) <= checkpoint_step(path)]
            self.say(f"resumed from {path} (step {self.state['step']}, {self.state['samples']} samples consumed)")
            self.say_optimizer_changes(path)
            if self.state.get("sample_order", self.sample_order) != self.sample_order:
                self.say(f"warning: the data (or a mixture's weights), data.seq_len or run.seed differ from those {path} was trained "
                         f"with: the run goes on from sample {self.state['samples']} of another order, some samples it saw may come again")
            self.state["sample_order"] = self.sample_order
            return
        if checkpoints:
            raise CheckpointError(f"none of the {len(checkpoints)} checkpoints in {checkpoints_folder(self.run_dir)} can be read (warnings "
                                  "above): resume from a good copy with checkpoint.resume = PATH, or start a new run in another run.dir")

    def say_optimizer_changes(self, path: Path) -> None:
        """[optim] and train.steps as configured apply to a resumed run: where they differ from the checkpoint's run,
        say so (the learning rate, a function of the step, train.steps and the rates, may jump: by how much)."""
        try:
            theirs = load_config(path / CONFIG_FILE, world_size=None)
        except ConfigError:  # a checkpoint that does not say: nothing to compare
            return
        for change in (schedule_change, adamw_change):
            if line := change(theirs, self.cfg, self.state["step"], path):
                self.say(line)

    def take_over(self, replaced: list[Path]) -> None:
        """Delete run.dir's checkpoints outside this run's history (checkpoint.overwrite = true) and the folders of saves
        that never finished (as large as a checkpoint), then make sure no other folder stands where this run will save:
        it replaces none."""
        if replaced and self.is_writer:
            for path in replaced:
                shutil.rmtree(path)
            self.say(f"checkpoint.overwrite = true: deleted {', '.join(p.name for p in replaced)} of another history from {self.run_dir}")
        for path in unfinished_saves(self.run_dir) if self.is_writer else []:
            shutil.rmtree(path)
            self.say(f"deleted {path}: a save that never finished")
        start = self.state["step"]
        for path in step_folders(self.run_dir):
            if path not in replaced and start < checkpoint_step(path) and self.saves_at(checkpoint_step(path)):
                raise CheckpointError(f"{path} is in the way: this run saves its step-{checkpoint_step(path)} checkpoint there and "
                                      "replaces no folder it did not write; move that folder away or delete it")

    def saves_at(self, done: int) -> bool:
        """Whether the run saves a checkpoint after `done` steps (checkpoint.every; the last step unless every = -1)."""
        every, steps = self.cfg.checkpoint.every, self.cfg.train.steps
        return done <= steps and ((every > 0 and done % every == 0) or (every >= 0 and done == steps))

    def resume_command(self) -> str:
        """The command that continues this run from its newest checkpoint in run.dir."""
        args = list(self.command)
        if self.history and self.cfg.checkpoint.resume != "auto":
            args.append(f"--checkpoint.resume={self.history[-1]}")
        default = "torchrun [the same options] -m megassm.train" if launched_by_torchrun() else "python -m megassm.train"
        return f"{os.environ.get(LAUNCH_ENV) or default} {shlex.join(args)}"

    def stop_message(self, signum: int) -> str:
        """Where the run stopped on a signal and how to go on."""
        step, newest = self.state["step"], self.history[-1] if self.history else None
        stopped = f"stopped by {signal.Signals(signum).name} after step {step} of {self.cfg.train.steps}"
        if newest is None:
            return f"{stopped}, with no checkpoint of this run to resume from; start again with: {self.resume_command()}"
        if checkpoint_step(newest) == step:
            return f"{stopped}, saved as {newest}; resume with: {self.resume_command()}"
        return f"{stopped}; resume from its newest checkpoint, {newest}, with: {self.resume_command()}"

    def init_weights_from(self, path: str) -> None:
        """Start from the weights of a published or converted model (checkpoint.init_from): read as stored (a bf16
        model in half the memory of fp32), each tensor cast into its parameter and let go."""
        _, state = load_pretrained(path, expect=self.cfg.model, dtype=None)
        roles = param_roles(self.model)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(local_piece(state.pop(name), roles[name], self.ctx.tp_group))
        self.say(f"initialised from {path}")

    def micro_batches(self) -> list:
        """This rank's micro batches of the step after the samples consumed so far."""
        data, par, consumed = self.cfg.data, self.cfg.parallel, self.state["samples"]
        return [self.train_data.batch(rank_samples(consumed, m, self.ctx.dp_rank, par.dp, data.micro_batch, data.global_batch),
                                      data.micro_batch).to(self.device)
                for m in range(self.cfg.accumulation_steps)]

    def autocast(self) -> contextlib.AbstractContextManager:
        # CUDA graphs replay their own weight casts: autocast's cache of them must be off (make_graphed_callables).
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16",
                              cache_enabled=not self.model.cuda_graphs)

    def train_step(self, step: int, timer: StepTimer) -> QueuedStep:
        """One optimizer step, queued on the device (nothing here waits for it)."""
        with timer.data_wait():
            batches = self.micro_batches()
        targets = global_sum(sum((b.labels != IGNORE_INDEX).sum() for b in batches).float(), self.ctx)
        loss_sum = torch.zeros((), device=self.device)
        for m, batch in enumerate(batches):
            with self.engine.micro_step(is_last=m == len(batches) - 1):
                with self.autocast():
                    losses = self.engine(batch.input_ids, batch.seq_idx, batch.labels)
                self.engine.backward(losses.sum() / targets)
            loss_sum += losses.detach().sum()
        lr = learning_rate(step, self.cfg.optim, self.cfg.train.steps)
        return QueuedStep(step + 1, loss_sum, targets, HostScalar(self.engine.step(lr, self.cfg.optim.grad_clip)), lr)

    def say_new_epoch(self, done: int) -> None:
        """Where step `done` read a training split's last unread sample: a line, as the next steps read them again."""
        samples, mixture = self.state["samples"], self.train_data.mixture
        read = zip(mixture.read_by(samples), mixture.read_by(samples - self.cfg.data.global_batch))
        for name, loader, (now, then) in zip(self.data_names, self.train_data.loaders, read):
            windows = loader.num_windows
            if now // windows > then // windows:
                split = "the training split's" if len(self.data_names) == 1 else f"{name}'s training"
                self.say(f"step {done}: every one of {split} {windows:,} samples has been read {now // windows} time(s); the run "
                         "reads them again, in another order")

    def read_norm(self, queued: QueuedStep) -> float:
        """The step's gradient norm (waiting for its backward); where it is not finite the engine skipped the update:
        counted, and the run stops after train.max_skipped_steps such steps in a row. The global norm is non-finite
        wherever any rank's loss was."""
        grad_norm = queued.grad_norm.item()
        finite = math.isfinite(grad_norm)
        self.consecutive_skips = 0 if finite else self.consecutive_skips + 1
        self.state["skipped_steps"] += not finite
        skips, most = self.consecutive_skips, self.cfg.train.max_skipped_steps
        if skips >= most:
            then = f"resume from {self.history[-1]}" if self.history else "start the run again"
            raise TrainingError(f"{skips} consecutive steps had a non-finite loss or gradient (the last: step {queued.done}); their "
                                "updates were skipped and no checkpoint written during them. Lower optim.lr, raise optim.warmup_steps, or "
                                f"check the data, then {then}")
        if skips:
            self.say(f"step {queued.done}: the loss or gradient is not finite; the step's update was skipped ({skips} in a row: "
                     f"the run stops at {most})")
        return grad_norm

    @torch.no_grad()
    def validation_losses(self) -> dict[str, float]:
        """{"val_loss": the mean loss over the same held-out samples every time}: the first train.eval_samples of the
        validation order, shared among the DP ranks; of a mixture, each folder's ("val_loss/NAME") and their mean
        weighted by the folders' shares."""
        data, par, samples = self.cfg.data, self.cfg.parallel, self.cfg.train.eval_samples
        total = torch.zeros(len(self.val_data), 2, device=self.device)
        for folder, val_data in enumerate(self.val_data):
            for m in range(samples // (par.dp * data.micro_batch)):
                batch = val_data.batch(rank_samples(0, m, self.ctx.dp_rank, par.dp, data.micro_batch, samples), data.micro_batch)
                batch = batch.to(self.device)
                with self.autocast():
                    losses = self.model(batch.input_ids, batch.seq_idx, batch.labels)
                total[folder] += torch.stack([losses.sum(), (batch.labels != IGNORE_INDEX).sum().float()])
        loss_sum, count = global_sum(total, self.ctx).unbind(1)
        losses = (loss_sum / count).tolist()
        if len(losses) == 1:
            return {"val_loss": losses[0]}
        mean = sum(share * loss for share, loss in zip(self.data_shares, losses))
        return {"val_loss": mean, **{f"val_loss/{name}": loss for name, loss in zip(self.data_names, losses)}}

    def save(self) -> None:
        """A checkpoint of this step, once the previous one is complete; written while training goes on
        (checkpoint.async_save), else waited for."""
        self.saved_everywhere()
        copies = self.host_copies if self.cfg.checkpoint.async_save else None
        self.saving = start_checkpoint(self.run_dir, self.cfg, self.model, self.engine, self.ctx, self.state, self.vocabulary, copies)
        # One written after skipped updates (a stop or the last step during a streak) keeps the earlier ones: its weights
        # may be what made those steps' losses non-finite.
        self.saving_step, self.saving_rotates = self.state["step"], self.consecutive_skips == 0
        if not self.saving.copied:
            if self.saving.short_of_host_memory is not None and not self.said_short_of_host_memory:
                needed, left = self.saving.short_of_host_memory
                self.say(f"warning: a checkpoint's host copy would take {needed / 2**30:.1f} GiB of host memory on a process "
                         f"with {left / 2**30:.1f} GiB left to it (copies may take {HOST_MEMORY_SHARE:.0%}): training waits "
                         "while checkpoints are written, as with checkpoint.async_save = false")
                self.said_short_of_host_memory = True
            self.finish_saving()

    def finish_saving(self, wait: bool = True) -> None:
        """The checkpoint being written, once over (at once unless `wait`): the checkpoint named in
        the history and the log, and the run's checkpoints beyond the newest checkpoint.keep deleted; or its failure
        (every rank learns of any rank's) kept in save_failure, to stop every rank."""
        if self.saving is None or not (wait or self.saving.done()):
            return
        saving, self.saving, path = self.saving, None, checkpoint_dir(self.run_dir, self.saving_step)
        try:
            saving.wait()
        except Exception as error:
            self.save_failure = CheckpointError(f"checkpoint {path} could not be written ({error}); the run stops rather than train "
                                                f"on without checkpoints: free space or fix {self.run_dir}, then resume")
            return
        self.history.append(path)
        kept = "" if self.saving_rotates else " after steps whose updates were skipped: the earlier checkpoints are kept"
        self.say(f"saved checkpoint {path} (written in {time.monotonic() - saving.started:.1f} s){kept}")
        if not self.saving_rotates:
            return
        old, self.history = self.history[: -self.cfg.checkpoint.keep], self.history[-self.cfg.checkpoint.keep :]
        if self.is_writer:
            for path in old:
                shutil.rmtree(path)

    def saved_everywhere(self) -> None:
        """Wait for the checkpoint being written: no rank goes on (or leaves: the launcher stops the others when one
        process ends) before it is complete, and a failure (known to every rank) stops every rank."""
        self.finish_saving()
        if self.save_failure is not None:
            raise self.save_failure

    def stop_requested(self, signals: StopSignals) -> int | None:
        """The signal any rank received, or a checkpoint's failure raised on every rank after the same step: with the
        line that names it where this rank's write had not yet ended when another rank learnt of it."""
        try:
            return signals.requested(self.device, self.save_failure)
        except FailedElsewhere:
            self.saved_everywhere()
            raise

    def abandon_saving(self) -> None:
        """After an error: the checkpoint being written, incomplete unless it needs nothing more from other ranks,
        given a bounded time to end before the process does."""
        if self.saving is not None:
            self.saving.abandon(ABANDONED_WRITE_WAIT)

    def open_log(self) -> MetricsLogger:
        """The run's config.toml and its log, which keeps the records of the history this run continues (none where it
        resumed from a checkpoint outside run.dir: that history's records are in the log beside it)."""
        cfg = self.cfg
        step = self.state["step"] if self.history else 0
        if self.is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(cfg, self.run_dir / CONFIG_FILE)
            if dropped := drop_records_after(self.run_dir, step):
                self.say(f"dropped {dropped} lines after step {step} from {self.run_dir / METRICS_FILE}: "
                         "this run logs its own history from there")
        return MetricsLogger(self.run_dir, self.is_writer, cfg.logging.wandb, cfg.logging.wandb_project, cfg.run.name or self.run_dir.name,
                             cfg.to_dict(), total_steps=cfg.train.steps, continues=bool(self.history))

    def run(self) -> None:
        """Train to train.steps; on a stop signal (SIGINT, SIGTERM, SIGHUP) save a checkpoint after the step in progress
        and raise Stopped. A step's gradient norm is read once the next step is queued, or at once where the step logs,
        validates, saves or stops the run."""
        cfg = self.cfg
        self.logger = self.open_log()
        timer = StepTimer(self.device)
        tokens_per_step, logged_step = cfg.data.global_batch * cfg.data.seq_len, self.state["step"]
        unread = None
        with StopSignals(self.stop_message) as signals, self.logger:  # the logger closed also on a stop or an error
            for step in range(self.state["step"], cfg.train.steps):
                try:
                    queued = self.train_step(step, timer)
                except torch.OutOfMemoryError:
                    raise OutOfMemory(out_of_memory_advice(cfg, step, **self.memory_levers)) from None
                if unread is not None:
                    self.read_norm(unread)
                unread, done = queued, queued.done
                self.state["step"], self.state["samples"] = done, self.state["samples"] + cfg.data.global_batch
                self.say_new_epoch(done)
                self.logger.progress(done)
                self.finish_saving(wait=False)
                logs = done % cfg.train.log_every == 0 or done == cfg.train.steps
                validates = bool(self.val_data) and (done % cfg.train.eval_every == 0 or done == cfg.train.steps)
                signum = self.stop_requested(signals) if done < cfg.train.steps else None
                due = self.saves_at(done) or self.save_postponed
                if not (logs or validates or due or signum):
                    continue
                grad_norm, unread = self.read_norm(queued), None
                # No checkpoint over a streak of skipped updates: rotation could delete the last one from before it.
                self.save_postponed = due and self.consecutive_skips > 0 and done < cfg.train.steps
                saves = due and not self.save_postponed
                metrics = {}
                if logs:
                    lap = timer.lap()
                    metrics = {"step": done, "loss": (global_sum(queued.loss_sum, self.ctx) / queued.targets).item(), "lr": queued.lr,
                               "grad_norm": grad_norm,
                               **throughput((done - logged_step) * tokens_per_step, lap.elapsed, self.world_size, self.flops_per_token,
                                            self.peak),
                               "mem_gib": memory_gib(self.device), "data_fraction": lap.data_fraction,
                               "skipped_steps": self.state["skipped_steps"]}
                    logged_step = done
                if validates:
                    with timer.excluded():
                        metrics = {"step": done, **metrics, **self.validation_losses()}
                if metrics:
                    self.logger.log(metrics)
                if saves:
                    with timer.excluded():
                        self.save()
                if signum:
                    if cfg.checkpoint.every >= 0 and not saves:
                        self.save()
                    self.saved_everywhere()
                    raise Stopped(signum, self.stop_message(signum))
            self.saved_everywhere()


def attempts() -> list[dict]:
    """Owner.attempt of every rank (a collective), each once."""
    mine = Owner.this_process().attempt
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return [json.loads(attempt) for attempt in sorted({json.dumps(attempt, sort_keys=True) for attempt in everyone})]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=TRAINER_PROGRAM, description=__doc__.split("\n\n")[0],
                                     epilog="Any --section.key=value overrides that key of the config, e.g. --train.steps=100.")
    parser.add_argument("--config", help="a TOML config (see configs/); the defaults when omitted")
    args, overrides = parser.parse_known_args(argv)
    imports_done()
    rank = int(os.environ.get("RANK", 0))
    trainer = None
    if launched_by_torchrun():
        die_with_launcher()
    with contextlib.ExitStack() as held:  # the run's lock, let go after any checkpoint write in flight has ended
        try:
            cfg = load_config(args.config, overrides, world_size=int(os.environ.get("WORLD_SIZE", 1)))
            trainer = Trainer(cfg, command=argv, hold=held.enter_context)
            started, first_step = time.perf_counter(), trainer.state["step"]
            if first_step >= cfg.train.steps:
                trainer.say(f"nothing to do: the run is at step {first_step} and train.steps = {cfg.train.steps} "
                            "(raise train.steps to train further)")
                return 0
            trainer.run()
        except Stopped as stop:
            if rank == 0:
                print(f"{TRAINER_PROGRAM}: {stop}", file=sys.stderr)
            return stop.exit_code
        except KeyboardInterrupt:
            if rank == 0:
                print(f"{TRAINER_PROGRAM}: {STOPPED_WHILE_STARTING}", file=sys.stderr)
            return 128 + signal.SIGINT
        except UserError as error:  # one line per job, from rank 0, where every rank meets the same
            # This rank's own (out of memory), one met before the ranks joined, maybe on this node alone (its copy of the
            # config file, its device), or rank 0 missing at start-up: a line per node.
            first_of_node = int(os.environ.get("LOCAL_RANK", 0)) == 0
            its_own = (isinstance(error, OutOfMemory) or (not dist.is_initialized() and first_of_node)
                       or (isinstance(error, MissingAtStart) and error.without_rank_0 and first_of_node))
            # Before the ranks joined, rank 0 may meet the same mistake seconds later (a loaded machine): were this rank
            # to end first, torchrun would stop rank 0 before it said why, and the run would end without a line.
            said_if_alone = not dist.is_initialized() and launched_by_torchrun()
            if rank == 0:
                print(f"{TRAINER_PROGRAM}: error: {error}", file=sys.stderr)
            elif its_own or said_if_alone:
                if not its_own:
                    time.sleep(SAY_ALONE_AFTER.total_seconds())
                print(f"{TRAINER_PROGRAM}: error on rank {rank} ({socket.gethostname()}): {error}", file=sys.stderr)
            return USER_ERROR_EXIT if not isinstance(error, TrainingError) else 1  # 1: restarted, where it may not recur
        finally:  # after the error's line is printed
            if trainer is not None:
                trainer.abandon_saving()
            if dist.is_initialized():
                dist.destroy_process_group()
    checkpoints = f", checkpoints in {checkpoints_folder(trainer.run_dir)}" if cfg.checkpoint.every >= 0 else ""
    trainer.say(f"done: steps {first_step + 1}-{cfg.train.steps} in {time.perf_counter() - started:.1f} s; "
                f"metrics in {trainer.run_dir / METRICS_FILE}{checkpoints}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Checkpoints with torch.distributed.checkpoint, every tensor in its logical shape.

Each rank hands DCP its pieces as DTensors over its TP group (sharded as their roles say, parallel/roles.py), so the
checkpoint holds whole logical tensors — the five in_proj segments separately, the vocabulary-split
embedding whole — written in parallel, each piece once (DP and CP replicas are deduplicated). Loading
asks for the pieces of the current layout, which DCP reads from whatever layout wrote them: a
checkpoint resumes under any TP/CP/DP layout and either data-parallel engine.

`checkpoints/step_N/` holds DCP's files (`.metadata`, `*.distcp`: the model and AdamW's state),
`trainer.json` (step, samples consumed, ...), the resolved `config.toml` and `vocabulary.json` (the
tokenizer the token ids come from). It is written under a temporary name and renamed when complete, so
a crash mid-write leaves a `.tmp` folder that resuming ignores, never a half checkpoint.

Before loading, a checkpoint is checked against the model and tokenizer of the run: one that cannot be
read is DamagedCheckpoint (resuming skips it for an older one), one of another model or tokenizer is
IncompatibleCheckpoint, naming the key or tensor that differs (resuming stops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megassm.checkpoint_files import METADATA_FILE, first_damaged_file
from megassm.checkpoint_writer import BackgroundWrite, HostCopies
from megassm.config import Config, ConfigError, read_model_config, section_toml, write_config
from megassm.data.shards import folder_sha256
from megassm.errors import UserError
from megassm.model import ModelConfig
from parallel import ParallelContext, param_roles
from parallel.context import group_size
from parallel.data_parallel import DataParallelEngine

T = TypeVar("T")
STEP_DIR = re.compile(r"step_(\d+)")
TRAINER_FILE, CONFIG_FILE, VOCABULARY_FILE = "trainer.json", "config.toml", "vocabulary.json"
MODEL_FILE = "model.toml"  # a converted checkpoint's model; a trained one has the run's config.toml
EMPTY_OPTIMIZER = {"state": {}, "param_groups": "[]"}
# Resuming reads the optimizer state a batch of parameters at a time, at most this many bytes of their logical tensors
# (or one parameter's; a TP rank holds its share), so that an engine placing each parameter's state (ZeRO: a slice of
# it) holds one batch beside it, not a second copy of the whole: an 8B model's AdamW state is 64 GB.
OPTIMIZER_READ_BYTES = 1 << 30
# The [model] keys that may change between runs of one model: chunk_size (how the scan is computed) and the
# initialisation. Every other key makes another model (its parameters or the function computed): a key added to
# ModelConfig counts as architecture unless named here.
NOT_ARCHITECTURE_KEYS = ("chunk_size", "dt_min", "dt_max", "dt_init_floor", "A_init_range", "init_std")
ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in NOT_ARCHITECTURE_KEYS)


def architecture(cfg: ModelConfig) -> dict[str, object]:
    """What makes `cfg` another model than one with different values: the ARCHITECTURE_KEYS that apply (attention's
    and the MLP's only with such blocks, RoPE's only with it), the pattern as its layer kinds (an empty pattern is
    every block Mamba-2)."""
    kinds, applies = cfg.layer_kinds, set(ARCHITECTURE_KEYS)
    if "*" not in kinds:
        applies -= {"attn_heads", "attn_kv_heads", "attn_head_dim", "rope", "rope_theta", "rope_fraction"}
    elif not cfg.rope:
        applies -= {"rope_theta", "rope_fraction"}
    if "-" not in kinds:
        applies -= {"mlp_hidden", "mlp_activation"}
    return {key: kinds if key == "pattern" else getattr(cfg, key) for key in ARCHITECTURE_KEYS if key in applies}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint, or run.dir's checkpoints, that this run cannot use as configured; the message says what would do."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files cannot be read back; the message names it."""


class IncompatibleCheckpoint(CheckpointError):
    """A checkpoint of another model or tokenizer than the run's; the message names the key or tensor that differs."""


def checkpoints_folder(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints, one step_N folder each."""
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_folder(run_dir) / f"step_{step}"


def unfinished_save(final: Path) -> Path:
    """Where a checkpoint is written before it is renamed to `final`, complete."""
    return final.with_name(f".{final.name}.tmp")


def unfinished_saves(run_dir: Path) -> list[Path]:
    """The folders of saves that never finished (the run stopped while saving), left in run.dir/checkpoints."""
    return sorted(p for p in checkpoints_folder(run_dir).glob(".step_*.tmp") if p.is_dir())


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.fullmatch(Path(path).name)[1])


def step_folders(run_dir: Path) -> list[Path]:
    """Every checkpoints/step_N folder of a run, complete or not, oldest first."""
    return sorted((p for p in checkpoints_folder(run_dir).glob("step_*") if STEP_DIR.fullmatch(p.name) and p.is_dir()), key=checkpoint_step)


def is_complete(path: Path) -> bool:
    """Whether a folder has the files that mark a checkpoint: trainer.json (written last) and DCP's .metadata.
    Its tensors may still be unreadable (DamagedCheckpoint when loaded)."""
    return (path / TRAINER_FILE).is_file() and (path / METADATA_FILE).is_file()


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [p for p in step_folders(run_dir) if is_complete(p)]


def tokenizer_vocabulary(tokenizer: Path, vocab_size: int) -> dict:
    """What the token ids of a run mean: the tokenizer's size and a sha256 over its folder's files."""
    return {"vocab_size": vocab_size, "tokenizer_sha256": folder_sha256(Path(tokenizer))}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_writer() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class _Layout:
    """How this rank's tensors map to logical ones: DTensors over its TP group (plain tensors alone)."""

    def __init__(self, ctx: ParallelContext, model: nn.Module):
        device = next(model.parameters()).device
        self.mesh = DeviceMesh.from_group(ctx.tp_group, device.type) if ctx.tp_group is not None else None
        self.roles = param_roles(model)

    def logical(self, local: Tensor, name: str) -> Tensor:
        """`local`, this rank's piece of parameter `name` (or of a tensor of its shape), as the logical tensor."""
        if self.mesh is None:
            return local
        dim = self.roles[name].tp_dim
        return DTensor.from_local(local, self.mesh, [Replicate() if dim is None else Shard(dim)], run_check=False)

    @staticmethod
    def local(tensor: Tensor) -> Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _param_names(model: nn.Module, engine: DataParallelEngine) -> list[str]:
    """The name of each parameter in the order of the engine's optimizer state indices."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for p in engine.params]


def _state_to_save(model: nn.Module, engine: DataParallelEngine, layout: _Layout) -> dict:
    """{"model": {name: tensor}, "optimizer": {"state": {name: {key: value}}, "param_groups": [...]}}, logical."""
    saved, names = engine.state_dict(), _param_names(model, engine)  # a collective under ZeRO
    params = engine.params
    state = {names[i]: {k: layout.logical(v.to(params[i].device), names[i]) if torch.is_tensor(v) and v.shape == params[i].shape else v
                        for k, v in values.items()}
             for i, values in saved["state"].items()}
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]]
    return {"model": {name: layout.logical(p.detach(), name) for name, p in model.named_parameters()},
            "optimizer": {"state": state, "param_groups": json.dumps(groups)}}  # a string: DCP would flatten a list


def start_checkpoint(run_dir: Path, cfg: Config, model: nn.Module, engine: DataParallelEngine, ctx: ParallelContext,
                     trainer_state: dict, vocabulary: dict | None = None, copies: HostCopies | None = None) -> BackgroundWrite:
    """Begin checkpoints/step_{trainer_state['step']} (collective: every rank calls it), with the tokenizer's
    `vocabulary` (tokenizer_vocabulary) when given, written in the background: with `copies` (kept between
    checkpoints) this rank's part of the state is copied to host memory before the return, and training may go on;
    without, or where the result's `copied` is false (some rank's host memory lacked room), it is read where it is:
    wait() on the result before changing it. On the writing rank the write then completes the checkpoint, and the
    result's `result` is the folder. An existing folder of that name is never replaced: CheckpointError."""
    final = checkpoint_dir(run_dir, trainer_state["step"])
    temporary = unfinished_save(final)
    if final.exists():
        raise CheckpointError(f"cannot save step {trainer_state['step']}: {final} exists; move it away and resume")

    def make_temporary() -> None:
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        except OSError as error:
            raise CheckpointError(f"cannot save step {trainer_state['step']}: cannot create {temporary} ({error.strerror or error}): "
                                  f"free space or make {temporary.parent} writable, then resume") from None

    decided_by_first(make_temporary)
    complete = functools.partial(_complete, temporary, final, cfg, vocabulary, dict(trainer_state)) if _is_writer() else None
    with _single_process_quiet():
        return BackgroundWrite(_state_to_save(model, engine, _Layout(ctx, model)), temporary, copies, complete)


def save_checkpoint(run_dir: Path, cfg: Config, model: nn.Module, engine: DataParallelEngine, ctx: ParallelContext,
                    trainer_state: dict, vocabulary: dict | None = None) -> Path | None:
    """start_checkpoint from the live state, waited for on every rank. Returns the folder on the writing rank."""
    write = start_checkpoint(run_dir, cfg, model, engine, ctx, trainer_state, vocabulary)
    write.wait()
    _barrier()
    return write.result


def _complete(temporary: Path, final: Path, cfg: Config, vocabulary: dict | None, trainer_state: dict) -> Path:
    """The writing rank's end of a checkpoint, once DCP's files are written: the small files, then the rename."""
    write_config(cfg, temporary / CONFIG_FILE)
    if vocabulary is not None:
        (temporary / VOCABULARY_FILE).write_text(json.dumps(vocabulary, indent=1))
    (temporary / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))  # last: marks it complete
    # On disk before it is named complete, and named so before the run rotates older checkpoints away (DCP syncs its
    # own files): after a crash of the node the newest complete checkpoint is whole.
    for path in (temporary / CONFIG_FILE, temporary / VOCABULARY_FILE, temporary / TRAINER_FILE, temporary):
        _sync(path)
    temporary.rename(final)
    _sync(final.parent)
    return final


def _sync(path: Path) -> None:
    """fsync a file or folder, where it exists and its file system can."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # a folder on some network and FUSE file systems
            raise
    finally:
        os.close(fd)


def resume_candidates(run_dir: Path, resume: str) -> list[Path]:
    """The checkpoints `checkpoint.resume` names, to try in order: "auto" -> the run's complete ones,
    newest first (a damaged one is skipped); "none" -> none; else that path (an error if it is not a
    complete checkpoint)."""
    if resume == "none":
        return []
    if resume == "auto":
        return checkpoints_in(run_dir)[::-1]
    path = Path(resume)
    takes = "checkpoint.resume takes \"auto\", \"none\" or a checkpoint's folder"
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume = {resume}: no such folder; {takes}")
    if not is_complete(path):
        newest = checkpoints_in(path)
        if newest:
            raise CheckpointError(f"checkpoint.resume = {resume} is a run's folder: give one of its checkpoints, e.g. its newest, "
                                  f"{newest[-1]}")
        raise CheckpointError(f"checkpoint.resume = {resume}: not a complete checkpoint (no {TRAINER_FILE} or {METADATA_FILE} "
                              f"there); {takes}")
    return [path]


def check_compatible(path: Path, model: ModelConfig, vocabulary: dict | None) -> None:
    """IncompatibleCheckpoint unless the checkpoint holds `model`'s architecture (`architecture`) and, where both
    are known, comes from the same tokenizer; DamagedCheckpoint when it does not say which model it holds."""
    described = next((path / name for name in (CONFIG_FILE, MODEL_FILE) if (path / name).is_file()), None)
    if described is None:
        raise DamagedCheckpoint(f"{path} has neither {CONFIG_FILE} nor {MODEL_FILE} to say which model it holds")
    try:
        saved = read_model_config(described)
    except ConfigError as error:
        raise DamagedCheckpoint(f"cannot read {described}: {error}") from None
    new_run = "start a new run in another run.dir"
    theirs, ours = architecture(saved), architecture(model)
    for key, value in ours.items():  # where the layer kinds or RoPE differ, "pattern" or "rope" comes first
        if theirs.get(key) != value:
            raise IncompatibleCheckpoint(f"{path} holds another model: model.{key} = {theirs.get(key)!r} there, "
                                         f"{value!r} in this config; {new_run} to train this one, or resume with that value")
    if vocabulary is None or not (path / VOCABULARY_FILE).is_file():
        return
    with _reading(path / VOCABULARY_FILE):
        theirs = json.loads((path / VOCABULARY_FILE).read_text())
    if theirs != vocabulary:
        raise IncompatibleCheckpoint(f"{path} was trained with another tokenizer ({_tokenizer(theirs)}) than the one of data.path "
                                     f"({_tokenizer(vocabulary)}): its token ids mean other things; {new_run} to train on this data, "
                                     "or use data made with that tokenizer")


def _tokenizer(vocabulary: dict) -> str:
    return f"{vocabulary.get('vocab_size')} tokens, sha256 {str(vocabulary.get('tokenizer_sha256'))[:12]}"


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every one-process save and load, even when told that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Failures to read a checkpoint's files as DamagedCheckpoint (DCP raises a BaseException of its own)."""
    try:
        yield
    except (CheckpointException, RuntimeError, OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError,
            pickle.UnpicklingError) as error:
        raise DamagedCheckpoint(f"cannot read {path}: {first_damaged_file(path) or type(error).__name__}") from error


def _load(target: dict, path: Path, group: dist.ProcessGroup | None = None) -> None:
    """DCP's load of `target`, collective over `group` (every rank where None)."""
    with _single_process_quiet(), _reading(path):
        dcp.load(target, checkpoint_id=path, process_group=group, no_dist=not _distributed())


def decided_by_first(decide: Callable[[], T], group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> T:
    """decide() on the first rank of `group` (every rank where None), and its result, or the UserError it raised, on
    every rank of it: so that all ranks act on one view, as where another node's view of a shared filesystem lags
    behind (NFS caches directory listings)."""
    if not _distributed():
        return decide()
    decision: list = [None]
    if dist.get_rank(group) == 0:
        try:
            decision = [(decide(), None)]
        except UserError as error:
            decision = [(None, error)]
    dist.broadcast_object_list(decision, src=dist.get_global_rank(group, 0) if group else 0, group=group, device=device)
    result, error = decision[0]
    if error is not None:
        raise error
    return result


def _load_once(target: dict, path: Path, ctx: ParallelContext, device: torch.device) -> None:
    """Load `target` (model tensors, optimizer state, param_groups: any of them) on the first rank of DP x CP alone
    (with its TP group), then broadcast it to the others, which hold the same pieces: the checkpoint is read once per
    TP rank, not once per GPU (64 GPUs of DP would read it 64 times from a shared filesystem). A damaged checkpoint
    stops every rank alike."""
    if group_size(ctx.dp_cp_group) == 1:
        return _load(target, path, ctx.tp_group)
    optimizer = target.setdefault("optimizer", {})

    def read() -> str | None:
        _load(target, path, ctx.tp_group)
        return optimizer.get("param_groups")

    param_groups = decided_by_first(read, ctx.dp_cp_group, device)
    if param_groups is not None:
        optimizer["param_groups"] = param_groups
    source = dist.get_global_rank(ctx.dp_cp_group, 0)
    tensors = [_Layout.local(t) for t in (*target.get("model", {}).values(), *(v for state in optimizer.get("state", {}).values()
                                                                                for v in state.values()))]
    for tensor in tensors:  # in the same order on every rank: the model's parameters, then the saved state's keys
        moved = tensor.to(device)
        dist.broadcast(moved, src=source, group=ctx.dp_cp_group)
        if moved is not tensor:
            tensor.copy_(moved)


def _saved_tensors(path: Path) -> dict:
    """DCP's metadata of each saved tensor, by flattened key ("model.<name>", "optimizer.state.<name>.<key>")."""
    with _reading(path):
        metadata = dcp.FileSystemReader(path).read_metadata()
    return {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}


def load_checkpoint(path: Path, model: nn.Module, engine: DataParallelEngine, ctx: ParallelContext) -> dict:
    """Load this rank's pieces of the model and optimizer state, whatever layout wrote them; returns the
    trainer state. Collective: every rank calls it."""
    saved = _saved_tensors(path)
    params = dict(model.named_parameters())
    mismatched = set(params) ^ {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    if mismatched:
        raise IncompatibleCheckpoint(f"{path}: its parameters do not match the model's ({', '.join(sorted(mismatched)[:4])} ...): "
                                     "was it written for another model config?")
    layout = _Layout(ctx, model)
    for name, p in params.items():
        theirs, ours = tuple(saved[f"model.{name}"].size), tuple(layout.logical(p.detach(), name).shape)
        if theirs != ours:
            raise IncompatibleCheckpoint(f"{path}: tensor {name} is {theirs} there, {ours} in this model: it was written for "
                                         "another model config")
    target = {"model": {name: layout.logical(torch.empty_like(p), name) for name, p in params.items()},
              "optimizer": {"param_groups": EMPTY_OPTIMIZER["param_groups"]}}
    device = next(iter(params.values())).device
    _load_once(target, path, ctx, device)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(layout.local(target["model"].pop(name)))  # each copy let go before the optimizer state is read
    engine.weights_loaded()
    names = _param_names(model, engine)
    index = {name: i for i, name in enumerate(names)}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in json.loads(target["optimizer"]["param_groups"])]
    if groups:
        state = _SavedOptimizerState(lambda batch: _load_once({"optimizer": {"state": batch}}, path, ctx, device), saved,
                                     [(name, params[name]) for name in names], layout)
        engine.load_state_dict({"state": state, "param_groups": groups})
    with _reading(path / TRAINER_FILE):
        return json.loads((path / TRAINER_FILE).read_text())


class _SavedOptimizerState(Mapping):
    """A checkpoint's optimizer state by the engine's parameter index, this rank's pieces, read when first asked for a
    batch of parameters at a time (OPTIMIZER_READ_BYTES of their logical tensors, so alike on every rank), the previous
    batch let go first. `read` loads a batch ({name: {key: tensor}}) collectively: every rank asks for the same indices
    in the same order. (DeepSpeed's engine asks for each parameter group's first entry first: a batch or two is read
    twice.)"""

    def __init__(self, read: Callable[[dict], None], saved: dict, params: list[tuple[str, nn.Parameter]], layout: _Layout):
        self.read, self.params, self.layout = read, params, layout
        self.entries: dict[int, dict] = {}  # index: {key: (element-wise, DCP's metadata)}, parameters with a state alone
        for index, (name, _) in enumerate(params):
            prefix = f"optimizer.state.{name}."
            entry = {k.removeprefix(prefix): (tuple(meta.size) == tuple(saved[f"model.{name}"].size), meta)
                     for k, meta in saved.items() if k.startswith(prefix)}
            if entry:
                self.entries[index] = entry
        self.batches, size = [[]], 0
        for index, entry in self.entries.items():
            nbytes = sum(math.prod(meta.size) * meta.properties.dtype.itemsize for elementwise, meta in entry.values() if elementwise)
            if self.batches[-1] and size + nbytes > OPTIMIZER_READ_BYTES:
                self.batches.append([])
                size = 0
            self.batches[-1].append(index)
            size += nbytes
        self.batch_of = {index: b for b, batch in enumerate(self.batches) for index in batch}
        self.loaded: dict[int, dict[str, Tensor]] = {}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if index not in self.loaded:
            batch = self.batches[self.batch_of[index]]
            self.loaded = {}  # the previous batch let go before the next is allocated
            self.loaded = self._read(batch)
        return self.loaded[index]

    def _read(self, batch: list[int]) -> dict[int, dict[str, Tensor]]:
        target = {}
        for index in batch:
            name, p = self.params[index]
            target[name] = {key: self.layout.logical(torch.empty_like(p), name) if elementwise
                            else torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
                            for key, (elementwise, meta) in self.entries[index].items()}
        self.read(target)
        return {index: {k: self.layout.local(v) for k, v in target[self.params[index][0]].items()} for index in batch}

    def __contains__(self, index: object) -> bool:
        return index in self.entries

    def __iter__(self) -> Iterator[int]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def read_model_state(path: Path) -> dict[str, Tensor]:
    """The whole (logical) model tensors of a checkpoint, in one process: for tools (export, generation)."""
    saved = _saved_tensors(path)
    model = {k.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in saved.items() if k.startswith("model.")}
    _load({"model": model}, path)
    return model


def save_model_checkpoint(cfg: ModelConfig, state: dict[str, Tensor], out: Path) -> None:
    """A checkpoint to continue pretraining from, in one process: this module's layout at step 0 with the
    model alone (no optimizer state) and model.toml (the [model] table) in place of a run's config.toml."""
    out.mkdir(parents=True, exist_ok=True)
    with _single_process_quiet():
        dcp.save({"model": state, "optimizer": EMPTY_OPTIMIZER}, checkpoint_id=out, no_dist=True)
    (out / MODEL_FILE).write_text(section_toml("model", dataclasses.asdict(cfg)))
    (out / TRAINER_FILE).write_text(json.dumps({"step": 0, "samples": 0, "skipped_steps": 0}, indent=1))  # last: marks it complete

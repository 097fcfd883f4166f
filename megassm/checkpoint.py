"""Checkpoints with torch.distributed.checkpoint, every tensor in its logical shape.

Each rank hands DCP its pieces as DTensors over its TP group (sharded along `param.tp_dim`), so the
checkpoint holds whole logical tensors — the five in_proj segments separately, the vocabulary-split
embedding whole — written in parallel, each piece once (DP and CP replicas are deduplicated). Loading
asks for the pieces of the current layout, which DCP reads from whatever layout wrote them: a
checkpoint resumes under any TP/CP/DP layout and either data-parallel engine.

`checkpoints/step_N/` holds DCP's files (`.metadata`, `*.distcp`: the model and AdamW's state),
`trainer.json` (step, samples consumed, ...) and the resolved `config.toml`. It is written under a
temporary name and renamed when complete, so a crash mid-write leaves a `.tmp` folder that resuming
ignores, never a half checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megassm.config import Config, section_toml, write_config
from megassm.model import ModelConfig
from parallel import ParallelContext
from parallel.data_parallel import DataParallelEngine

STEP_DIR = re.compile(r"step_(\d+)")
TRAINER_FILE, CONFIG_FILE = "trainer.json", "config.toml"
MODEL_FILE = "model.toml"  # a converted checkpoint's model; a trained one has the run's config.toml
EMPTY_OPTIMIZER = {"state": {}, "param_groups": "[]"}


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("step_*") if STEP_DIR.fullmatch(p.name) and (p / TRAINER_FILE).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name)[1]))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_writer() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class _Layout:
    """How this rank's tensors map to logical ones: DTensors over its TP group (plain tensors alone)."""

    def __init__(self, ctx: ParallelContext, device: torch.device):
        self.mesh = DeviceMesh.from_group(ctx.tp_group, device.type) if ctx.tp_group is not None else None

    def logical(self, local: Tensor, param: nn.Parameter) -> Tensor:
        if self.mesh is None:
            return local
        dim = getattr(param, "tp_dim", None)
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
    state = {names[i]: {k: layout.logical(v.to(params[i].device), params[i]) if torch.is_tensor(v) and v.shape == params[i].shape else v
                        for k, v in values.items()}
             for i, values in saved["state"].items()}
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]]
    return {"model": {name: layout.logical(p.detach(), p) for name, p in model.named_parameters()},
            "optimizer": {"state": state, "param_groups": json.dumps(groups)}}  # a string: DCP would flatten a list


def save_checkpoint(run_dir: Path, cfg: Config, model: nn.Module, engine: DataParallelEngine, ctx: ParallelContext,
                    trainer_state: dict) -> Path | None:
    """Write checkpoints/step_{trainer_state['step']} (collective: every rank calls it); keep the newest
    cfg.checkpoint.keep. Returns the folder on the writing rank."""
    final = Path(run_dir) / "checkpoints" / f"step_{trainer_state['step']}"
    temporary = final.with_name(f".{final.name}.tmp")
    if _is_writer():
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier()
    layout = _Layout(ctx, next(model.parameters()).device)
    with _single_process_quiet():
        dcp.save(_state_to_save(model, engine, layout), checkpoint_id=temporary, no_dist=not _distributed())
    _barrier()
    if not _is_writer():
        return None
    write_config(cfg, temporary / CONFIG_FILE)
    (temporary / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))  # last: marks it complete
    shutil.rmtree(final, ignore_errors=True)
    temporary.rename(final)
    for old in checkpoints_in(run_dir)[: -cfg.checkpoint.keep]:
        shutil.rmtree(old)
    return final


def resume_candidates(run_dir: Path, resume: str) -> list[Path]:
    """The checkpoints `checkpoint.resume` names, to try in order: "auto" -> the run's complete ones,
    newest first (a damaged one is skipped); "none" -> none; else that path (an error if it is not a
    complete checkpoint)."""
    if resume == "none":
        return []
    if resume == "auto":
        return checkpoints_in(run_dir)[::-1]
    path = Path(resume)
    if not (path / TRAINER_FILE).exists() or not (path / ".metadata").exists():
        raise FileNotFoundError(f"checkpoint.resume = {resume}: not a complete checkpoint (no {TRAINER_FILE} / .metadata there)")
    return [path]


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every one-process save and load, even when told that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class DamagedCheckpoint(RuntimeError):
    """A checkpoint whose files cannot be read back; the message names it."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Failures to read a checkpoint's files as DamagedCheckpoint (DCP raises a BaseException of its own)."""
    try:
        yield
    except (CheckpointException, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise DamagedCheckpoint(f"cannot read {path} ({type(error).__name__})") from error


def _load(target: dict, path: Path) -> None:
    with _single_process_quiet(), _reading(path):
        dcp.load(target, checkpoint_id=path, no_dist=not _distributed())


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
        raise ValueError(f"{path}: its parameters do not match the model's ({', '.join(sorted(mismatched)[:4])} ...): "
                         "was it written for another model config?")
    layout = _Layout(ctx, next(model.parameters()).device)
    optimizer_state = {}
    for name, p in params.items():
        prefix = f"optimizer.state.{name}."
        keys = {k.removeprefix(prefix): meta for k, meta in saved.items() if k.startswith(prefix)}
        optimizer_state[name] = {key: layout.logical(torch.empty_like(p), p) if tuple(meta.size) == tuple(saved[f"model.{name}"].size)
                                 else torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in keys.items()}
    target = {"model": {name: layout.logical(torch.empty_like(p), p) for name, p in params.items()},
              "optimizer": {**EMPTY_OPTIMIZER, "state": optimizer_state}}
    _load(target, path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(layout.local(target["model"][name]))
    index = {name: i for i, name in enumerate(_param_names(model, engine))}
    state = {index[name]: {k: layout.local(v) for k, v in values.items()} for name, values in optimizer_state.items() if values}
    groups = [{**group, "params": [index[name] for name in group["params"]]} for group in json.loads(target["optimizer"]["param_groups"])]
    if groups:
        engine.load_state_dict({"state": state, "param_groups": groups})
    return json.loads((path / TRAINER_FILE).read_text())


def read_model_state(path: Path) -> dict[str, Tensor]:
    """The whole (logical) model tensors of a checkpoint, in one process: for tools (export, generation)."""
    saved = _saved_tensors(path)
    model = {k.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items() if k.startswith("model.")}
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

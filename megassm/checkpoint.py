"""Checkpoints in the logical layout: every tensor whole (the five in_proj segments separately), so
one written under any TP/CP/DP layout loads under any other; each rank keeps its own piece on load.

`checkpoints/step_N/` holds `state.pt` (model, optimizer), `trainer.json` (step, samples consumed,
...) and the resolved `config.toml`. It is written under a temporary name and renamed when complete:
a crash mid-write leaves a `.tmp` folder that resuming ignores, never a half checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megassm.config import Config, write_config
from parallel import ParallelContext, full_tensor, local_piece

STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("step_*") if STEP_DIR.fullmatch(p.name) and (p / "trainer.json").exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name)[1]))


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _whole(tensor: torch.Tensor, param: nn.Parameter, ctx: ParallelContext) -> torch.Tensor:
    """tensor, shaped like this rank's piece of param, made whole (logical) on CPU."""
    return full_tensor(tensor, getattr(param, "tp_dim", None), ctx.tp_group).cpu()


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext) -> dict[str, dict]:
    """Per parameter name, its optimizer state with parameter-shaped tensors made whole over TP."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        out[name] = {k: _whole(v, p, ctx) if torch.is_tensor(v) and v.shape == p.shape else v
                     for k, v in state.items()}
    return out


def save_checkpoint(run_dir: Path, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext,
                    trainer_state: dict) -> Path | None:
    """Write checkpoints/step_{trainer_state['step']} (collective: every rank calls it); keep the newest
    cfg.checkpoint.keep. Returns the folder on the writing rank."""
    step = trainer_state["step"]
    model_state = {name: _whole(p, p, ctx) for name, p in model.named_parameters()}
    optim_state = _named_optimizer_state(model, optimizer, ctx)
    final = Path(run_dir) / "checkpoints" / f"step_{step}"
    if _is_writer():
        temporary = final.with_name(f".step_{step}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        torch.save({"model": model_state, "optimizer": optim_state}, temporary / "state.pt")
        write_config(cfg, temporary / "config.toml")
        (temporary / "trainer.json").write_text(json.dumps(trainer_state, indent=1))  # last: marks it complete
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in checkpoints_in(run_dir)[: -cfg.checkpoint.keep]:
            shutil.rmtree(old)
    _barrier()
    return final if _is_writer() else None


def find_resume_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint that `checkpoint.resume` names: "auto" -> the newest complete one of the run (None
    if there is none), "none" -> None, else that path (an error if it is not a complete checkpoint)."""
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpoints_in(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer.json").exists() or not (path / "state.pt").exists():
        raise FileNotFoundError(f"checkpoint.resume = {resume}: not a complete checkpoint (no trainer.json / state.pt there)")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: ParallelContext) -> dict:
    """Load this rank's pieces of the model and optimizer state; returns the trainer state."""
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    missing = set(params) ^ set(saved["model"])
    if missing:
        raise ValueError(f"{path}: parameters do not match the model ({', '.join(sorted(missing)[:4])} ...): was it written for another model config?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(local_piece(saved["model"][name], p, ctx.tp_group))
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    state = {}
    for name, p in params.items():
        named = saved["optimizer"].get(name, {})
        if named:
            state[index[id(p)]] = {k: local_piece(v, p, ctx.tp_group) if torch.is_tensor(v) and v.shape == saved["model"][name].shape else v
                                   for k, v in named.items()}
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return json.loads((path / "trainer.json").read_text())


"""AdamW parameter groups and the learning-rate schedule (linear warmup, then a cosine, linear or 1 - sqrt decay to min_lr,
from the warmup's end or, warmup-stable-decay, over the last steps)."""

from __future__ import annotations

import math

from torch import nn

from megassm.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: as mamba-ssm, none on A_log, D, dt_bias, norm weights and biases
    (every one-dimensional parameter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


DECAY_SHAPES = {  # the share of (lr - min_lr) left at the decay's progress t, from 1 at t = 0 to 0 at t = 1
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
    "linear": lambda t: 1 - t,
    "1-sqrt": lambda t: 1 - math.sqrt(t),
}


def decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """The first step of the decay, which runs at lr: right after the warmup, or with decay_fraction the start of
    train.steps' last share (never within the warmup)."""
    return max(cfg.warmup_steps, _share_start(cfg, total_steps))


def _share_start(cfg: OptimConfig, total_steps: int) -> int:
    """The first step of train.steps' last decay_fraction (half a step rounded up); 0 without decay_fraction."""
    return 0 if cfg.decay_fraction is None else total_steps - math.floor(total_steps * cfg.decay_fraction + 0.5)


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The rate of optimizer step `step` (0-based): lr * (step + 1) / warmup_steps during warmup, lr until the
    decay's first step, then along the decay's shape down to min_lr at the last step (and after it)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = decay_start(cfg, total_steps)
    progress = min(max(step - start, 0) / max(total_steps - 1 - start, 1), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * DECAY_SHAPES[cfg.decay](progress)


def schedule_warning(cfg: OptimConfig, total_steps: int) -> str | None:
    """A line where the warmup or decay_fraction leave the decay no step (a short run of a config made for a long one)."""
    last = learning_rate(total_steps - 1, cfg, total_steps)
    never = f"the rate {{}} {last:.2e} at the last step (optim.lr = {cfg.lr:.2e}) and never decays to optim.min_lr"
    if cfg.warmup_steps and cfg.warmup_steps >= total_steps - 1:
        return (f"warning: optim.warmup_steps = {cfg.warmup_steps} leaves no step of train.steps = {total_steps} to the decay: "
                f"{never.format('rises to')}; lower optim.warmup_steps")
    if total_steps > 1 and decay_start(cfg, total_steps) >= total_steps - 1:
        return (f"warning: optim.decay_fraction = {cfg.decay_fraction} of train.steps = {total_steps} leaves the decay no step: "
                f"{never.format('stays at')}; raise optim.decay_fraction")
    if cfg.warmup_steps > _share_start(cfg, total_steps) > 0:
        return (f"warning: optim.warmup_steps = {cfg.warmup_steps} ends after the start of the decay optim.decay_fraction = "
                f"{cfg.decay_fraction} asks for (step {_share_start(cfg, total_steps)}): the rate decays over the "
                f"{total_steps - cfg.warmup_steps} steps after the warmup only")
    return None

"""AdamW parameter groups and the learning-rate schedule (linear warmup, cosine decay to min_lr)."""

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


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The rate of optimizer step `step` (0-based): lr * (step + 1) / warmup_steps during warmup,
    then a half cosine from lr down to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(total_steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def schedule_warning(cfg: OptimConfig, total_steps: int) -> str | None:
    """A line where the warmup leaves no step to the decay (a short run of a config made for a long one)."""
    if cfg.warmup_steps == 0 or cfg.warmup_steps < total_steps - 1:
        return None
    last = learning_rate(total_steps - 1, cfg, total_steps)
    return (f"warning: optim.warmup_steps = {cfg.warmup_steps} leaves no step of train.steps = {total_steps} to the decay: the rate "
            f"rises to {last:.2e} at the last step (optim.lr = {cfg.lr:.2e}) and never decays to optim.min_lr; lower optim.warmup_steps")

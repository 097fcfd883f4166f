"""The DDP engine's optimizer step, which decides clipping and skipping on the device (fused AdamW's grad_scale and
found_inf), against torch's reference: clip_grad_norm_ then an unfused AdamW step, and no step at all where the
gradient is not finite."""

import copy
import math

import pytest
import torch
from torch import nn

from megassm.host_scalar import HostScalar
from parallel import DDPEngine, ParallelContext


def model_with_grads(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3, bias=False))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


def groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


@pytest.mark.parametrize("scale, max_norm", [(1.0, 0.5), (1.0, 1e3), (1.0, 0.0), (1e-3, 0.5)])  # clipped, not reached, off, small
def test_the_step_equals_clipping_then_adamw(scale, max_norm):
    model, reference = model_with_grads(scale), model_with_grads(scale)
    engine = DDPEngine(model, ParallelContext(), groups(model), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    optimizer = torch.optim.AdamW(groups(reference), lr=0.0, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step, lr in enumerate((1e-2, 3e-2)):
        if step:
            for p, q in zip(model.parameters(), reference.parameters()):
                p.grad = torch.randn_like(p, generator=torch.Generator().manual_seed(step)) * scale
                q.grad = p.grad.clone()
        norm = engine.step(lr, max_norm)
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm if max_norm > 0 else math.inf)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        assert HostScalar(norm).item() == pytest.approx(want.item(), rel=1e-6)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q)  # fp32's tolerance: the clipping factor is fp32 in both


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_leaves_weights_and_adamw_state_as_they_were(bad):
    model = model_with_grads(1.0)
    engine = DDPEngine(model, ParallelContext(), groups(model), lr=0.0)
    engine.step(1e-2, 1.0)  # AdamW has state now
    before = copy.deepcopy((model.state_dict(), engine.optimizer.state_dict()))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    next(model.parameters()).grad[0, 0] = bad
    norm = engine.step(1e-2, 1.0)
    assert not math.isfinite(HostScalar(norm).item())
    weights, state = before
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for index, entry in engine.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, state["state"][index][key]), (index, key)
    assert all(p.grad is None for p in model.parameters())


def test_a_loaded_state_keeps_the_configured_hyperparameters():
    """A resumed run's weight decay, betas and eps are its config's (torch's load_state_dict would take the saved
    groups'); the moments and step counts are the checkpoint's, and the next step is AdamW's with the new settings."""
    model = model_with_grads(1.0)
    saved = DDPEngine(model, ParallelContext(), groups(model), lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    saved.step(1e-2, 0.0)
    state = copy.deepcopy(saved.optimizer.state_dict())

    resumed_model, reference = copy.deepcopy(model), copy.deepcopy(model)
    changed = [{**group, "weight_decay": 0.0} for group in groups(resumed_model)]
    resumed = DDPEngine(resumed_model, ParallelContext(), changed, lr=0.0, betas=(0.8, 0.5), eps=1e-3)
    resumed.load_state_dict(copy.deepcopy(state))  # torch's load keeps the given tensors: one copy each
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in resumed.optimizer.param_groups] == [(0.0, (0.8, 0.5), 1e-3)] * 2
    for p, q in zip(resumed_model.parameters(), model.parameters()):
        torch.testing.assert_close(resumed.optimizer.state[p]["exp_avg"], saved.optimizer.state[q]["exp_avg"], rtol=0, atol=0)

    optimizer = torch.optim.AdamW([{**g, "weight_decay": 0.0} for g in groups(reference)], lr=0.0, betas=(0.8, 0.5), eps=1e-3,
                                  foreach=False)
    optimizer.load_state_dict(copy.deepcopy(state))
    for group in optimizer.param_groups:
        group.update(lr=1e-2, weight_decay=0.0, betas=(0.8, 0.5), eps=1e-3)
    for p, q in zip(resumed_model.parameters(), reference.parameters()):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    resumed.step(1e-2, 0.0)
    optimizer.step()
    for p, q in zip(resumed_model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)

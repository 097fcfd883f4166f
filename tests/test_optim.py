"""What AdamW decays (mamba-ssm's recipe), the learning-rate schedule, and when skipped steps stop a run: each against
values written out by hand, not against the code's own rule."""

import math
import typing
from types import SimpleNamespace

import pytest
import torch

from megassm.config import OptimConfig
from megassm.model import Mamba2LM, ModelConfig
from megassm.optim import DECAY_SHAPES, learning_rate, param_groups, schedule_warning
from megassm.train import Trainer, TrainingError
from parallel import DDPEngine, ParallelContext

# mamba-ssm's recipe: no weight decay on A_log, D, dt_bias, norm weights and biases; the rest (matrices, the conv's
# weights, the embedding) decays.
NOT_DECAYED = ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm_weight", "norm.weight", "norm_f.weight", "mixer.conv1d.bias.x",
               "mixer.conv1d.bias.B", "mixer.conv1d.bias.C")


def test_adamw_decays_matrices_and_the_embedding_only():
    """Zero gradients: AdamW's update is nil and only the decay acts, p <- p (1 - lr wd), on the parameters that decay."""
    model = Mamba2LM(ModelConfig.from_preset("debug-hybrid"))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    DDPEngine(model, ParallelContext(), param_groups(model, 0.1), lr=0.0).step(1e-2, 0.0)
    for name, p in model.named_parameters():
        kept = name.split(".", 2)[-1] in NOT_DECAYED or name == "norm_f.weight"
        torch.testing.assert_close(p.detach(), before[name] if kept else before[name] * (1 - 1e-2 * 0.1), rtol=1e-6, atol=0, msg=name)


def test_the_schedule_warms_up_linearly_then_falls_as_a_half_cosine_to_min_lr():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    total = 111  # the cosine spans steps 10 .. 110
    assert learning_rate(0, cfg, total) == pytest.approx(1e-4)
    assert learning_rate(4, cfg, total) == pytest.approx(5e-4)
    assert learning_rate(9, cfg, total) == pytest.approx(1e-3)
    assert learning_rate(10, cfg, total) == pytest.approx(1e-3)
    assert learning_rate(60, cfg, total) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(35, cfg, total) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert learning_rate(110, cfg, total) == pytest.approx(1e-5)
    assert learning_rate(500, cfg, total) == pytest.approx(1e-5)  # train.steps raised on resume: past the end, min_lr


@pytest.mark.parametrize("decay, shape", [("cosine", lambda t: (1 + math.cos(math.pi * t)) / 2), ("linear", lambda t: 1 - t),
                                           ("1-sqrt", lambda t: 1 - t ** 0.5)])
def test_warmup_stable_decay_holds_lr_then_decays_over_the_last_share_of_the_steps(decay, shape):
    """100 steps, warmup 10, decay_fraction 0.2: steps 10 .. 80 at lr, the decay over steps 80 .. 99 (19 intervals)."""
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, decay=decay, decay_fraction=0.2)
    assert learning_rate(4, cfg, 100) == pytest.approx(5e-4)
    assert [learning_rate(step, cfg, 100) for step in (9, 10, 50, 79, 80)] == pytest.approx([1e-3] * 5)
    for step in (81, 85, 90, 98):
        assert learning_rate(step, cfg, 100) == pytest.approx(1e-5 + (1e-3 - 1e-5) * shape((step - 80) / 19)), step
    assert learning_rate(99, cfg, 100) == pytest.approx(1e-5) and learning_rate(150, cfg, 100) == pytest.approx(1e-5)
    assert schedule_warning(cfg, 100) is None


def test_every_decay_the_config_takes_has_a_shape():
    choices = typing.get_args(typing.get_type_hints(OptimConfig)["decay"])
    assert set(choices) == set(DECAY_SHAPES) and all(DECAY_SHAPES[c](0) == 1 and DECAY_SHAPES[c](1) == 0 for c in choices)


@pytest.mark.parametrize("decay", ["linear", "1-sqrt"])
def test_the_decay_from_the_warmups_end_takes_its_shape(decay):
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=10, decay=decay)
    assert learning_rate(10, cfg, 111) == pytest.approx(1e-3) and learning_rate(110, cfg, 111) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(35, cfg, 111) == pytest.approx(1e-3 * (0.75 if decay == "linear" else 0.5))


def test_a_decay_fraction_within_the_warmup_decays_from_the_warmups_end():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=50, decay_fraction=0.9)
    assert learning_rate(50, cfg, 101) == pytest.approx(1e-3) and learning_rate(75, cfg, 101) == pytest.approx((1e-3 + 1e-5) / 2)


def test_a_warmup_past_the_decays_start_shortens_the_decay_and_is_said():
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=500, decay_fraction=0.8)
    assert learning_rate(500, cfg, 1000) == pytest.approx(1e-3) and learning_rate(999, cfg, 1000) == pytest.approx(0.0, abs=1e-12)
    assert schedule_warning(cfg, 1000) == (
        "warning: optim.warmup_steps = 500 ends after the start of the decay optim.decay_fraction = 0.8 asks for (step 200): the "
        "rate decays over the 500 steps after the warmup only")


@pytest.mark.parametrize("steps, start", [(10, 7), (14, 10), (6, 4)])
def test_the_decays_share_rounds_half_a_step_up(steps, start):
    """decay_fraction 0.25 of 10 steps is 2.5: 3 steps (7, 8, 9), as of 14 steps 3.5: 4; not Python's round-half-even."""
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, decay_fraction=0.25)
    assert learning_rate(start - 1, cfg, steps) == learning_rate(start, cfg, steps) == pytest.approx(1e-3)
    assert learning_rate(start + 1, cfg, steps) < 1e-3


def test_a_decay_fraction_that_leaves_the_decay_no_step_is_said():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=0, decay_fraction=0.01)  # round(0.5) = 0 steps of 50
    assert learning_rate(49, cfg, 50) == pytest.approx(1e-3)
    assert schedule_warning(cfg, 50) == (
        "warning: optim.decay_fraction = 0.01 of train.steps = 50 leaves the decay no step: the rate stays at 1.00e-03 at the last "
        "step (optim.lr = 1.00e-03) and never decays to optim.min_lr; raise optim.decay_fraction")


@pytest.mark.parametrize("warmup, steps, last", [(10, 4, 4e-4), (3, 4, 1e-3), (1, 1, 1e-3)])
def test_a_warmup_that_leaves_no_step_to_the_decay_is_said(warmup, steps, last):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=warmup)
    assert learning_rate(steps - 1, cfg, steps) == pytest.approx(last)  # the rate never falls below the last step's
    assert schedule_warning(cfg, steps) == (
        f"warning: optim.warmup_steps = {warmup} leaves no step of train.steps = {steps} to the decay: the rate rises to {last:.2e} at "
        "the last step (optim.lr = 1.00e-03) and never decays to optim.min_lr; lower optim.warmup_steps")


@pytest.mark.parametrize("warmup, steps", [(2, 4), (0, 1), (0, 100)])
def test_a_schedule_that_decays_says_nothing(warmup, steps):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=warmup)
    assert schedule_warning(cfg, steps) is None and learning_rate(steps - 1, cfg, steps) == pytest.approx(1e-5 if steps > 1 else 1e-3)


def read_norms(norms: list[float], max_skipped_steps: int) -> SimpleNamespace:
    """Trainer.read_norm over steps with these gradient norms; the trainer's counters after them."""
    trainer = SimpleNamespace(consecutive_skips=0, state={"skipped_steps": 0}, said=[], history=[],
                              cfg=SimpleNamespace(train=SimpleNamespace(max_skipped_steps=max_skipped_steps)))
    trainer.say = trainer.said.append
    for done, norm in enumerate(norms, 1):
        Trainer.read_norm(trainer, SimpleNamespace(grad_norm=torch.tensor(norm), done=done))
    return trainer


def test_only_skipped_steps_in_a_row_stop_a_run():
    """Isolated overflows are skipped and counted, however many; max_skipped_steps of them in a row stop the run."""
    trainer = read_norms([math.inf, 1.0, math.nan, 1.0, math.inf, 2.0, math.inf], max_skipped_steps=2)
    assert trainer.state["skipped_steps"] == 4 and trainer.consecutive_skips == 1
    with pytest.raises(TrainingError, match="2 consecutive steps had a non-finite loss or gradient \\(the last: step 3\\)"):
        read_norms([1.0, math.inf, math.inf], max_skipped_steps=2)

"""The chunked LM head + loss against torch's cross-entropy of the whole logits: the same losses and
gradients, one chunk's logits at a time, on one process and under tensor (and sequence) parallelism."""

import pytest
import torch
import torch.nn.functional as F

from megassm.model import Mamba2LM, ModelConfig, apply_loss_chunking
from parallel import ParallelContext, init_parallel, local_piece, param_roles, vocab_parallel_linear_cross_entropy
from tests.dispatch import Operators
from tests.distributed import run_distributed
from tests.test_parallel import relative_error

TOKENS, D_MODEL, VOCAB = (3, 10), 16, 64


def head_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h = torch.randn(*TOKENS, D_MODEL, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, D_MODEL, dtype=dtype, requires_grad=True)
    target = torch.randint(0, VOCAB, TOKENS)
    target[0, :4] = -100
    return h, weight, target


def losses_and_gradients(loss_fn, h, weight) -> tuple[torch.Tensor, ...]:
    """Per-token losses and d(weighted sum)/dh, d/dweight: unequal weights test grad_loss is applied per token."""
    loss = loss_fn(h, weight)
    grad_loss = torch.linspace(0.5, 2.0, loss.numel(), dtype=loss.dtype).view(loss.shape)
    return loss.detach(), *torch.autograd.grad((loss * grad_loss).sum(), (h, weight))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (b, l) of the whole logits (b, l, V), 0 where the target is -100."""
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none")


def full_logits_loss(target: torch.Tensor):
    return lambda h, weight: cross_entropy(F.linear(h, weight), target)


def chunked_loss(target: torch.Tensor, chunk_tokens: int):
    return lambda h, weight: vocab_parallel_linear_cross_entropy(h, weight, target, ParallelContext(), chunk_tokens)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1000])  # one token, a ragged last chunk, all in one
def test_matches_full_logits_in_float64(chunk_tokens):
    h, weight, target = head_inputs(torch.float64)
    want = losses_and_gradients(full_logits_loss(target), h, weight)
    got = losses_and_gradients(chunked_loss(target, chunk_tokens), h, weight)
    assert got[0].dtype == torch.float64 and (got[0][0, :4] == 0).all()
    for name, g, w in zip(("loss", "grad h", "grad weight"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("reduce", [lambda loss: loss.sum() / 5, lambda loss: 3 * loss.sum()], ids=["sum/n", "3*sum"])
def test_gradients_from_the_forward_pass_when_every_token_weighs_the_same(reduce):
    """The trainer's `losses.sum() / targets`: the gradients are computed in the forward pass and the
    backward only scales them (no logits recomputed, no matmul), still equal to the full-logits path."""
    h, weight, target = head_inputs(torch.float64)
    want = torch.autograd.grad(reduce(full_logits_loss(target)(h, weight)), (h, weight))
    loss = reduce(chunked_loss(target, 7)(h, weight))
    with Operators() as backward:
        got = torch.autograd.grad(loss, (h, weight))
    assert backward.matmuls == 0
    for name, g, w in zip(("grad h", "grad weight"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


def test_no_gradients_computed_without_autograd():
    """Validation runs under no_grad: one logits matmul per chunk, nothing for gradients."""
    h, weight, target = head_inputs(torch.float64)
    with torch.no_grad(), Operators() as forward:
        loss = chunked_loss(target, 7)(h, weight)
    assert forward.matmuls == 5  # 30 tokens in chunks of 7
    torch.testing.assert_close(loss, full_logits_loss(target)(h, weight).detach(), rtol=1e-10, atol=1e-10)


def test_bf16_autocast_stays_close_to_fp32_without_all_logits():
    h, weight, target = head_inputs(torch.float32)
    fp32 = losses_and_gradients(chunked_loss(target, 7), h, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16), Operators() as largest:
        bf16 = losses_and_gradients(chunked_loss(target, 7), h, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16), Operators() as unfused_largest:  # the unfused path under autocast
        unfused = losses_and_gradients(full_logits_loss(target), h, weight)
    all_logits = h.shape[0] * h.shape[1] * VOCAB
    assert unfused_largest.numel == all_logits and largest.numel == weight.numel() < all_logits, largest.numel
    for name, b, f, u in zip(("loss", "grad h", "grad weight"), bf16, fp32, unfused):
        assert b.dtype == f.dtype == torch.float32, name
        assert relative_error(b, f) < 2e-2, (name, relative_error(b, f))
        assert relative_error(b, u) < 1e-2, (name, relative_error(b, u))  # grad weight: one bf16 rounding less


CFG = ModelConfig.from_preset("debug", ngroups=4, chunk_size=8)


def check_tensor_parallel(sequence_parallel: bool) -> None:
    """Mamba2LM under tp=2 with 7-token loss chunks against one process computing full logits, float64."""
    ctx = init_parallel(tp=2, sequence_parallel=sequence_parallel, backend="gloo")
    ids, labels = torch.randint(0, CFG.vocab_size, (2, 2, 12), generator=torch.Generator().manual_seed(3))
    labels[0, :3] = -100
    torch.manual_seed(0)
    reference = Mamba2LM(CFG).double()
    h = reference.hidden_states(ids)
    want = cross_entropy(F.linear(h, reference.embedding.weight), labels)
    want.sum().backward()
    torch.manual_seed(0)
    model = Mamba2LM(CFG, ctx).double()
    apply_loss_chunking(model, 7)
    got = model(ids, labels=labels)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    roles = param_roles(model)
    for (name, p), full in zip(model.named_parameters(), reference.parameters()):
        if roles[name].sequence_parallel:  # each TP rank holds its sequence slice's share
            torch.distributed.all_reduce(p.grad, group=ctx.tp_group)
        torch.testing.assert_close(p.grad, local_piece(full.grad, roles[name], ctx.tp_group), rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_tensor_parallel_matches_one_process(sequence_parallel):
    run_distributed(check_tensor_parallel, 2, sequence_parallel)

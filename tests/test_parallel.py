"""Every parallel layout against one process: the same weights, the same global batch, in float32.
The loss and every parameter gradient must agree within 1e-5 (relative to the largest entry)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist

from megassm.model import MIXERS, Mamba2LM, Mamba2Mixer, ModelConfig
from parallel import DDPEngine, global_grad_norm, init_parallel, local_piece, param_roles, record_communication
from parallel.collectives import all_gather, all_reduce, collectives_through, reduce_scatter, shift
from tests.distributed import run_distributed

CFG = ModelConfig.from_preset("debug", ngroups=4, chunk_size=8)  # 8 heads in 4 groups; 44 tokens = 5.5 chunks
SEQLEN, ROWS_PER_DP_RANK = 44, 4
# Document starts per row, against CP slice edges at 11, 22, 33 (cp=4) or 22 (cp=2): on an edge with
# another start in the same slice (22), on an edge with none (11: nothing of 0..10 may reach 22..),
# inside slices, documents running through whole slices (13..35, 4..43), a one-token document (3).
BOUNDARIES = [(7, 22, 30), (5, 13, 35), (11, 40), (3, 4)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def global_batch(cfg: ModelConfig, dp: int):
    g = torch.Generator().manual_seed(7)
    rows = dp * ROWS_PER_DP_RANK
    ids = torch.randint(0, cfg.vocab_size, (rows, SEQLEN), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (rows, SEQLEN), generator=g)
    labels[0, :3] = -100  # ignored targets count nowhere
    seq_idx = torch.zeros(rows, SEQLEN, dtype=torch.long)
    for row in range(rows):
        for start in BOUNDARIES[row % len(BOUNDARIES)]:
            seq_idx[row, start:] += 1
    return ids, labels, seq_idx


def reference_gradients(cfg: ModelConfig, dtype: torch.dtype, ids, labels, seq_idx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of the one-process model on the whole global batch."""
    torch.manual_seed(0)
    model = Mamba2LM(cfg).to(dtype)
    loss = model(ids, seq_idx, labels).sum() / (labels != -100).sum()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def check_layout(cfg: ModelConfig, tp: int, cp: int, dp: int, sequence_parallel: bool, dtype: torch.dtype) -> None:
    """float64: the layout must reproduce one process to 1e-10, i.e. exactly up to rounding.
    float32: within 1e-5 (relative to each tensor's largest entry) of the exact float64 result,
    or, for the few small gradients where fp32 cancellation exceeds that, no further from it than 4x
    the one-process fp32 run is."""
    ctx = init_parallel(tp, cp, dp, sequence_parallel, backend="gloo")
    torch.manual_seed(0)
    model = Mamba2LM(cfg, ctx).to(dtype)  # the same logical initial weights as one process, this rank's pieces
    ids, labels, seq_idx = global_batch(cfg, dp)
    exact_loss, exact = reference_gradients(cfg, torch.float64, ids, labels, seq_idx)
    weights = reference_weights(cfg)
    roles = param_roles(model)
    for name, p in model.named_parameters():
        assert torch.equal(p.double(), local_piece(weights[name], roles[name], ctx.tp_group)), name

    rows = slice(ctx.dp_rank * ROWS_PER_DP_RANK, (ctx.dp_rank + 1) * ROWS_PER_DP_RANK)
    cols = slice(ctx.cp_rank * SEQLEN // cp, (ctx.cp_rank + 1) * SEQLEN // cp)
    engine = DDPEngine(model, ctx, [{"params": list(model.parameters())}], lr=0.0)  # the trainer's DP engine
    with engine.micro_step(is_last=True):
        loss = engine(ids[rows, cols], seq_idx[rows, cols], labels[rows, cols]).sum() / (labels != -100).sum()
        engine.backward(loss)
    engine.finish_gradients()
    total = all_reduce(loss.detach().clone(), ctx.dp_cp_group) if ctx.dp_cp_group else loss.detach()

    fp32 = None
    if dtype == torch.float32:
        fp32_loss, fp32 = reference_gradients(cfg, dtype, ids, labels, seq_idx)

    def check(what: str, got: torch.Tensor, want: torch.Tensor, same_precision: torch.Tensor | None) -> None:
        limit = 1e-10 if same_precision is None else max(1e-5, 4 * relative_error(same_precision.double(), want))
        error = relative_error(got.double(), want)
        assert error < limit, f"rank {dist.get_rank()}: {what} differs by {error:.2e} (bound {limit:.1e})"

    check("loss", total, exact_loss, None if fp32 is None else fp32_loss)
    exact_norm = torch.stack([g.pow(2).sum() for g in exact.values()]).sum().sqrt()
    fp32_norm = None if fp32 is None else torch.stack([g.double().pow(2).sum() for g in fp32.values()]).sum().sqrt()
    check("gradient norm", global_grad_norm(list(model.parameters()), list(roles.values()), ctx), exact_norm, fp32_norm)
    for name, p in model.named_parameters():
        piece = lambda full: local_piece(full, roles[name], ctx.tp_group)  # noqa: E731
        check(f"gradient of {name}", p.grad, piece(exact[name]), None if fp32 is None else piece(fp32[name]))


def reference_weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: p.detach().double() for name, p in Mamba2LM(cfg).named_parameters()}


LAYOUTS = {
    "tp2": (2, 1, 1, False),
    "tp4": (4, 1, 1, False),
    "tp2-sequence-parallel": (2, 1, 1, True),
    "cp2": (1, 2, 1, False),
    "cp4": (1, 4, 1, False),
    "tp2-cp2": (2, 2, 1, False),
    "dp2-cp2": (1, 2, 2, False),
}


def check_layout_in_both_precisions(tp: int, cp: int, dp: int, sequence_parallel: bool) -> None:
    for dtype in (torch.float64, torch.float32):
        check_layout(CFG, tp, cp, dp, sequence_parallel, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_one_process(layout):
    tp, cp, dp, sp = LAYOUTS[layout]
    run_distributed(check_layout_in_both_precisions, tp * cp * dp, tp, cp, dp, sp)


def count_mixer_collectives(sequence_parallel: bool, cfg: ModelConfig = CFG, kind: str = "M") -> None:
    """The mixer of a block of `kind` issues one collective each way under tp = 2 (one of each pair under SP)."""
    ctx = init_parallel(tp=2, sequence_parallel=sequence_parallel, backend="gloo")
    mixer = MIXERS[kind](cfg, ctx)
    u = torch.randn(2, 16 if sequence_parallel else 32, cfg.d_model, requires_grad=True)
    with record_communication() as forward:
        out = mixer(u)
    with record_communication() as backward:
        out.sum().backward()
    names = lambda records: [name for name, _ in records]  # noqa: E731
    if sequence_parallel:
        assert names(forward) == ["all_gather", "reduce_scatter"], forward
        assert names(backward) == ["all_gather", "reduce_scatter"], backward
    else:
        assert names(forward) == ["all_reduce"], forward
        assert names(backward) == ["all_reduce"], backward
        assert forward[0][1] == backward[0][1] == u.numel() * 4  # the (b, l, d_model) activations, once


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sequence-parallel"])
def test_tensor_parallel_mixer_issues_one_collective_each_way(sequence_parallel):
    run_distributed(count_mixer_collectives, 2, sequence_parallel)


def cp_bytes_per_layer() -> None:
    ctx = init_parallel(cp=2, backend="gloo")
    torch.manual_seed(0)
    mixer = Mamba2Mixer(CFG, ctx)
    sent = []
    for local_len in (16, 128):
        u = torch.randn(2, local_len, CFG.d_model, requires_grad=True)
        with record_communication() as records:
            mixer(u).sum().backward()
        sent.append(records)
    short, long = sent
    assert [name for name, _ in short] == ["all_gather", "all_gather", "reduce_scatter", "all_gather"], short  # halo, state; back
    assert short == long, (short, long)  # 8x the tokens, the same bytes


def test_context_parallel_bytes_do_not_grow_with_sequence_length():
    run_distributed(cp_bytes_per_layer, 2)


def replay_handed_collectives() -> None:
    """Each collective hands its communication to the runner of collectives_through; called again, it communicates
    what its tensors hold then, into the same outputs: what replaying CUDA graphs between collectives relies on
    (megassm/model/cuda_graphs.py)."""
    group = init_parallel(tp=2, backend="gloo").tp_group
    rank, handed = dist.get_rank(), []

    def run(communicate):
        communicate()
        handed.append(communicate)

    x = torch.arange(8.0).reshape(4, 2) + 10 * rank
    with collectives_through(run), record_communication() as records:
        reduced = all_reduce(x.clone(), group)
        gathered, scattered, shifted = all_gather(x, group, 0), reduce_scatter(x, group, 0), shift(x, group, 1)
    assert [name for name, _ in records] == ["all_reduce", "all_gather", "reduce_scatter", "all_gather"] and len(handed) == 4
    for scale in (1.0, 3.0):
        if scale != 1.0:  # new contents in the tensors the collectives read, then their communication again
            x.mul_(scale)
            reduced.copy_(x)
            for communicate in handed:
                communicate()
        ranks = [(torch.arange(8.0).reshape(4, 2) + 10 * r) * scale for r in range(2)]
        assert torch.equal(reduced, ranks[0] + ranks[1])
        assert torch.equal(gathered, torch.cat(ranks))
        assert torch.equal(scattered, (ranks[0] + ranks[1])[2 * rank : 2 * rank + 2])
        assert torch.equal(shifted, ranks[0] if rank == 1 else torch.zeros_like(x))


def test_collectives_handed_over_communicate_again_when_called():
    run_distributed(replay_handed_collectives, 2)


IMPOSSIBLE_LAYOUTS = [  # (tp, cp, dp, the error) in a world of 4
    (2, 2, 2, r"parallel.tp \* parallel.cp \* parallel.dp = 2 \* 2 \* 2 = 8, but the world size is 4"),
    (4, 1, 1, r"parallel.tp = 4 must divide the model's 2 groups \(model.ngroups: B and C are split by group; raise it"),
]


def refuse_layouts() -> None:
    for tp, cp, dp, message in IMPOSSIBLE_LAYOUTS:
        with pytest.raises(ValueError, match=message):
            ctx = init_parallel(tp, cp, dp, backend="gloo")
            Mamba2LM(dataclasses.replace(CFG, ngroups=2), ctx)
    dist.barrier()  # no rank leaves (closing its connections) while another still joins the groups of a layout


def test_impossible_layouts_are_refused():
    run_distributed(refuse_layouts, 4)

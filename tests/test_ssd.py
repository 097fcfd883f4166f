"""The chunked SSD reference against the plain token-by-token recurrence, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from megassm import ops
from megassm.ops.ssd import ssd_chunked


def naive_ssd(x, dt, A, B, C, D, dt_bias, dt_limit, initial_states, seq_idx):
    """state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T; y_t = state_t C_t + D x_t, reset at new documents."""
    batch, seqlen, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)
    C = C.repeat_interleave(heads_per_group, dim=2)
    dt = F.softplus(dt + dt_bias).clamp(*dt_limit)
    state = initial_states.clone()
    ys = []
    for t in range(seqlen):
        if t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)[:, None, None, None]
            state = state * same
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), state


def make_inputs(batch=2, seqlen=37, nheads=4, headdim=3, ngroups=2, dstate=5, boundaries=()):
    g = torch.Generator().manual_seed(1)
    f64 = dict(dtype=torch.float64)
    inputs = dict(
        x=torch.randn(batch, seqlen, nheads, headdim, generator=g, **f64),
        dt=torch.randn(batch, seqlen, nheads, generator=g, **f64),
        A=-torch.rand(nheads, generator=g, **f64) * 2 - 0.1,
        B=torch.randn(batch, seqlen, ngroups, dstate, generator=g, **f64),
        C=torch.randn(batch, seqlen, ngroups, dstate, generator=g, **f64),
        D=torch.randn(nheads, generator=g, **f64),
        dt_bias=torch.randn(nheads, generator=g, **f64) * 0.5,
        initial_states=torch.randn(batch, nheads, headdim, dstate, generator=g, **f64),
    )
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.long)
    for position in boundaries:
        seq_idx[:, position:] += 1
    seq_idx[1] += 3  # ids need not start at 0
    return inputs, seq_idx


CASES = {
    # name: (chunk_size, boundaries, dt_limit, ngroups)
    "one-document": (8, (), (0.0, math.inf), 2),
    "documents-inside-and-on-chunk-edges": (8, (5, 16, 17, 30), (0.0, math.inf), 2),
    "document-starts-at-token-0-of-chunk-1": (8, (8,), (0.0, math.inf), 1),
    "dt-limit-and-one-group": (16, (11,), (0.05, 0.5), 1),
    "chunk-longer-than-sequence": (64, (20,), (0.0, math.inf), 4),
}


@pytest.mark.parametrize("case", CASES)
def test_chunked_ssd_matches_recurrence_outputs_states_and_gradients(case):
    chunk_size, boundaries, dt_limit, ngroups = CASES[case]
    inputs, seq_idx = make_inputs(ngroups=ngroups, boundaries=boundaries)
    for t in inputs.values():
        t.requires_grad_(True)

    y, final = ssd_chunked(**inputs, chunk_size=chunk_size, dt_softplus=True, dt_limit=dt_limit, seq_idx=seq_idx, return_final_states=True)
    y_ref, final_ref = naive_ssd(**inputs, dt_limit=dt_limit, seq_idx=seq_idx)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)

    g = torch.Generator().manual_seed(2)
    dy, dfinal = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(final.shape, generator=g, dtype=y.dtype)
    names = list(inputs)
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), [inputs[n] for n in names])
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dfinal).sum(), [inputs[n] for n in names])
    for name, got, want in zip(names, grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_initial_state_reaches_only_the_first_document():
    inputs, seq_idx = make_inputs(boundaries=(10,))
    common = dict(chunk_size=8, dt_softplus=True, seq_idx=seq_idx)
    with_state = ssd_chunked(**inputs, **common)
    without = ssd_chunked(**{**inputs, "initial_states": None}, **common)
    assert not torch.allclose(with_state[:, :10], without[:, :10])
    torch.testing.assert_close(with_state[:, 10:], without[:, 10:], rtol=0, atol=0)


def test_fp32_inputs_give_fp32_outputs_close_to_float64():
    inputs, seq_idx = make_inputs(boundaries=(9,))
    y64 = ssd_chunked(**inputs, chunk_size=8, dt_softplus=True, seq_idx=seq_idx)
    y32 = ssd_chunked(**{k: v.float() for k, v in inputs.items()}, chunk_size=8, dt_softplus=True, seq_idx=seq_idx)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-5)


def test_backend_choice_on_cpu():
    inputs, _ = make_inputs()
    cpu = torch.device("cpu")
    assert ops.resolve_backend("auto", cpu) == "torch"
    assert ops.resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ops.KernelsUnavailable, match="backend = 'triton' needs CUDA tensors"):
        ops.ssd(**inputs, chunk_size=8, backend="triton")
    with pytest.raises(ValueError, match="backend = 'cuda': choose one of auto, torch, triton"):
        ops.ssd(**inputs, chunk_size=8, backend="cuda")


def test_document_ids_for_the_kernels():
    """Global document numbers (past int32, one row across 2^31) become int32 ids equal where they were, and a row's slice
    (a CP rank's) becomes the slice of the row's ids; int32 ids reach the kernels as they are, counted from the row's
    first token where initial states are given (mamba-ssm's kernels give those to document 0)."""
    big = 3 * 2**31
    global_ids = torch.tensor([[big, big, big + 1, big + 4], [big - 2, big - 1, big - 1, big]])

    def same_document(ids: torch.Tensor) -> torch.Tensor:
        return ids[:, :, None] == ids[:, None, :]

    ids = ops.int32_document_ids(global_ids)
    assert ids.dtype == torch.int32 and (ids >= 0).all()
    assert torch.equal(same_document(ids), same_document(global_ids))
    assert torch.equal(ops.int32_document_ids(global_ids[:, 2:]), ids[:, 2:])
    assert torch.equal(ops._kernel_seq_idx(global_ids), ids)
    counted = torch.tensor([[0, 0, 1, 4], [0, 1, 1, 2]], dtype=torch.int32)
    shifted = counted + 5
    assert torch.equal(ops._kernel_seq_idx(shifted), shifted)
    assert torch.equal(ops._kernel_seq_idx(shifted, initial_states=torch.zeros(2, 1, 1, 1)), counted)
    assert torch.equal(ops._kernel_seq_idx(global_ids, initial_states=torch.zeros(2, 1, 1, 1)), counted)
    assert ops._kernel_seq_idx(None) is None

"""megassm's Triton SSD kernels (megassm/ops/ssd_triton.py) against the reference ssd_chunked in float64,
run by Triton's interpreter on the CPU (tests/triton_interpreter.py), each case in a fresh process. float32 only
(the interpreter has no bf16; the GPU check is `python tools/bench_ssd_kernels.py`)."""

import sys
from typing import NamedTuple

import pytest
import torch

from tests.triton_interpreter import run_interpreted


class Case(NamedTuple):
    heads: int
    groups: int
    seqlen: int
    documents: bool
    with_initial: bool
    dt_softplus: bool
    dt_limit: tuple[float, float]
    D_per_channel: bool
    kernel_chunk: int
    final_in_loss: bool  # the loss reads the final states (else the backward gets no gradient for them)
    heads_per_program: int | None  # None: the heuristic's, 1 at these sizes (dB, dC as partial sums per head)
    walk_segments: int = 1  # segments of the chunk walks (one on the CPU unless set)
    headdim: int = 16
    dstate: int = 32
    gpu_tiles: bool = False  # d_state in the tiles of the kernels' first GPU configuration, not in tiles of 16


NO_LIMIT = (0.0, float("inf"))
CASES = {
    # Documents: one boundary exactly on a chunk edge (token 64), one inside a chunk, one spanning three chunks;
    # two groups of two heads; a partial last chunk; clamping on both sides of dt_limit.
    "documents": Case(4, 2, 150, True, True, True, (0.3, 1.5), False, 32, True, None),
    # A program takes all four heads of the group: their loop, C B^T shared, dB and dC summed in registers.
    "one-document": Case(4, 1, 100, False, False, True, NO_LIMIT, True, 32, False, 4),
    # No softplus: dt + bias clamped from below (the raw dt is often negative); whole chunks (no row masks).
    "group-per-head": Case(2, 2, 96, True, False, False, (0.05, float("inf")), False, 16, True, None),
    # The chunk walks in segments of 4, 4 and 2 chunks: a document starting where the second segment does, one inside
    # it; initial states carried through two segments' ends, d(final states) back through two.
    "segments": Case(4, 2, 150, True, True, True, (0.3, 1.5), False, 16, True, None, walk_segments=3),
    # The GPU's tiles and chunk of 64: a head dimension padded to a power of two (48 in tiles of 64), d_state in one
    # partial tile (96 in 128) and in a full and a partial one (the head gradients' tiles of 64).
    "gpu-tiles": Case(4, 2, 150, True, True, True, (0.3, 1.5), False, 64, True, None, headdim=48, dstate=96, gpu_tiles=True),
}
REFERENCE_CHUNK = 64


def _documents(batch: int, seqlen: int) -> torch.Tensor:
    """Row 0: documents of 64 | 23 | the rest (the first boundary on the edge of chunks of 16, 32 or 64);
    row 1: 5 | the rest, which spans several chunks."""
    rows = torch.zeros(batch, seqlen, dtype=torch.int32)
    rows[0, 64:] = 1
    rows[0, 87:] = 2
    rows[1, 5:] = 1
    return rows


def compare(heads: int, groups: int, seqlen: int, documents: bool, with_initial: bool, dt_softplus: bool, dt_limit: tuple[float, float],
            D_per_channel: bool, kernel_chunk: int, final_in_loss: bool, heads_per_program: int | None, walk_segments: int,
            headdim: int, dstate: int, gpu_tiles: bool) -> None:
    """y, the final states and every gradient (x, dt, A, B, C, D, dt_bias, initial states; through the final
    states too where the loss reads them), with x, B, C, dt strided views of one wider tensor as the mixer has them, then
    the backward writing dx, ddt, dB, dC into strided views of one gradient buffer."""
    from megassm.ops import ssd_triton_bwd, ssd_triton_fwd
    from megassm.ops.ssd import ssd_chunked
    from megassm.ops.ssd_triton import _chunk_walk, ssd_backward, ssd_forward, ssd_triton
    from tests.triton_interpreter import interpret_ssd_kernels

    interpret_ssd_kernels(block_n=None if gpu_tiles else 16)
    if heads_per_program:
        for module in (ssd_triton_fwd, ssd_triton_bwd):
            module.head_slice = lambda heads_per_group, chunk_programs: heads_per_program
    ssd_triton_fwd.walk_segments = lambda batch_heads, nchunks, device: walk_segments
    torch.manual_seed(0)
    batch = 2
    widths = [heads * headdim, groups * dstate, groups * dstate, heads]
    wide = torch.randn(batch, seqlen, sum(widths) + 3)
    wide[..., -heads - 3:-3] -= 1.0  # dt: softplus(dt + bias) around 0.3 to 1.5 with the bias below

    def views(t: torch.Tensor) -> list[torch.Tensor]:
        x, B, C, dt = torch.split(t[..., :-3], widths, dim=-1)
        return [x.unflatten(-1, (heads, headdim)), B.unflatten(-1, (groups, dstate)), C.unflatten(-1, (groups, dstate)), dt]

    A = -torch.rand(heads) - 0.2
    D = torch.randn(heads, headdim) if D_per_channel else torch.randn(heads)
    dt_bias = torch.rand(heads) * 0.5
    initial = torch.randn(batch, heads, headdim, dstate) if with_initial else None
    seq_idx = _documents(batch, seqlen) if documents else None
    dy = torch.randn(batch, seqlen, heads, headdim)
    dfinal = torch.randn(batch, heads, headdim, dstate) if final_in_loss else None
    options = dict(dt_softplus=dt_softplus, dt_limit=dt_limit, seq_idx=seq_idx)

    def run(ssd, dtype: torch.dtype) -> list[torch.Tensor]:
        leaf = wide.to(dtype).requires_grad_()
        params = [t.to(dtype).requires_grad_() for t in (A, D, dt_bias, initial) if t is not None]
        x, B, C, dt = views(leaf)
        y, final = ssd(x, dt, params[0], B, C, D=params[1], dt_bias=params[2], initial_states=params[3] if with_initial else None)
        loss = (y * dy.to(dtype)).sum() + ((final * dfinal.to(dtype)).sum() if final_in_loss else 0)
        grads = torch.autograd.grad(loss, [leaf, *params])
        return [y, final, *views(grads[0]), *grads[1:]]

    want = run(lambda *a, **k: ssd_chunked(*a, REFERENCE_CHUNK, return_final_states=True, **options, **k), torch.float64)
    got = run(lambda *a, **k: ssd_triton(*a, REFERENCE_CHUNK, return_final_states=True, kernel_chunk=kernel_chunk,
                                         **options, **k), torch.float32)
    names = ["y", "final_states", "dx", "dB", "dC", "ddt", "dA", "dD", "ddt_bias", "dinitial_states"][:len(want)]
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}")

    # As a fused mixer calls it, keeping the forward's states: the gradients written into their slices of one buffer,
    # nothing outside them, bit for bit those of ssd_triton, which recomputes the states in backward from the state handed
    # to each segment of their walk (one segment: from scratch). The walk from scratch also gives the forward's states;
    # other handed states give others (they are read).
    x, B, C, dt = views(wide)
    y, final, saved = ssd_forward(x, dt, A, B, C, REFERENCE_CHUNK, D=D, dt_bias=dt_bias, initial_states=initial,
                                  kernel_chunk=kernel_chunk, **options)
    buffer = torch.full_like(wide, float("nan"))
    dx, dB, dC, ddt = views(buffer)
    ssd_backward(dy, x, dt, A, B, C, REFERENCE_CHUNK, D=D, dt_bias=dt_bias, initial_states=initial, dfinal_states=dfinal,
                 saved=saved, dx=dx, ddt=ddt, dB=dB, dC=dC, **options)
    for name, written, recomputed in zip(["dx", "dB", "dC", "ddt"], views(buffer), got[2:6], strict=True):
        torch.testing.assert_close(written, recomputed, rtol=0, atol=0, msg=name)
    assert buffer[..., -3:].isnan().all(), "wrote outside the gradient slices"
    assert (saved.handed is not None) == (walk_segments > 1)
    if saved.handed is not None:
        def walk(handed: torch.Tensor | None) -> torch.Tensor:
            return _chunk_walk(x, dt, A, B, dt_bias, initial, seq_idx, dt_softplus, dt_limit, kernel_chunk, handed)[0].states

        assert torch.equal(walk(None), saved.states)
        assert not torch.equal(walk(saved.handed + 1.0), saved.states)


@pytest.mark.parametrize("case", CASES)
def test_triton_ssd_matches_the_reference(case):
    run_interpreted(__file__, case)


def test_kernels_compile_for_the_gpu(tmp_path, monkeypatch):
    """The interpreter runs the kernels' Python; this compiles them, bf16, for an H100/H200 (sm_90) down to
    a cubin with each autotuning configuration, which needs no GPU: what only the compiler rejects fails here."""
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    from megassm.ops import ssd_triton_fwd as fwd
    from tools.kernel_registers import SSD_POINTERS, compile_sm90, compile_ssd_kernel, ssd_autotuners

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    dt_constants = {"HAS_BIAS": True, "SOFTPLUS": True, "Q": 64, "BLOCK_H": fwd.DT_BLOCK_HEADS}
    assert compile_sm90(fwd._dt_kernel, dt_constants, SSD_POINTERS).asm["cubin"]
    carry_constants = {"SIZE": 64 * 128, "HAS_START": True, "REVERSE": True, "BLOCK": fwd.CARRY_BLOCK}
    assert compile_sm90(fwd._carry_kernel, carry_constants, SSD_POINTERS).asm["cubin"]
    variants = {"_states_kernel": [{}, {"SEGMENTED": True}], "_state_grads_kernel": [{}, {"SEGMENTED": True}],
                "_segment_ends_kernel": [{}, {"REVERSE": True}]}  # the walks also in segments, their ends in both directions
    for name, tuner in ssd_autotuners().items():
        for config in tuner.configs:
            tuned = {k: v for k, v in config.all_kwargs().items() if v is not None}
            for variant in variants.get(name, [{}]):
                assert compile_ssd_kernel(tuner, {**tuned, **variant}).asm["cubin"]


def test_kernel_registers_reports_what_ptxas_and_triton_allocate(tmp_path, monkeypatch):
    """tools/kernel_registers.py: registers from ptxas, instructions from nvdisasm, and the programs one SM holds."""
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    from tools.kernel_registers import compile_ssd_kernel, programs_per_sm, ptxas_report, sass_instructions, ssd_autotuners

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tuner = ssd_autotuners()["_states_kernel"]
    small = compile_ssd_kernel(tuner, dict(BLOCK_P=16, BLOCK_N=64, num_warps=4, num_stages=1))
    large = compile_ssd_kernel(tuner, dict(BLOCK_P=64, BLOCK_N=128, num_warps=4, num_stages=1))
    small_report, large_report = ptxas_report(small.asm["ptx"]), ptxas_report(large.asm["ptx"])
    assert 0 < small_report["registers"] < large_report["registers"] <= 255  # a 16 x 64 state tile against 64 x 128
    assert 0 < sass_instructions(small.asm["cubin"]) < sass_instructions(large.asm["cubin"])
    assert programs_per_sm(128, 4, 0) == 4 and programs_per_sm(64, 4, 100 * 1024) == 2  # 64K registers; 227 KiB


def test_walks_split_only_where_there_are_fewer_than_the_sms(monkeypatch):
    """walk_segments on a GPU of 132 SMs: 780m's 384 walks at 8 x 2048 and 1.3b's 256 stay whole; one 64K-token sequence's 48
    walks become 8 segments each (3 walks per SM); too short a walk is not split. walk_plan leaves no segment empty."""
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    from types import SimpleNamespace

    from megassm.ops import ssd_triton_fwd as fwd

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    gpu = torch.device("cuda")
    assert [fwd.walk_segments(walks, chunks, gpu) for walks, chunks in ((384, 32), (256, 64), (48, 1024), (48, 512), (24, 256), (48, 20))] \
        == [1, 1, 8, 8, 16, 1]
    assert fwd.walk_segments(48, 1024, torch.device("cpu")) == 1
    monkeypatch.setattr(fwd, "walk_segments", lambda walks, chunks, device: 4)
    plan = fwd.walk_plan(2, 9 * 16 - 5, 16, 16, 32, torch.device("cpu"))  # 9 chunks in 4 would leave one empty: 3 of 3
    assert (plan.count, plan.chunks, plan.chunk, tuple(plan.ends.shape), tuple(plan.carries.shape)) == (3, 3, 16, (3, 2, 16, 32), (3, 2))


if __name__ == "__main__":
    compare(*CASES[sys.argv[1]])

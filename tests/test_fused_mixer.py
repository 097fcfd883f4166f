"""The plumbing of megassm/ops/fused_mixer.py on the CPU: which slice of in_proj's output and of its
one gradient buffer each kernel reads and writes, and which of their results become which gradient.

megassm's SSD kernels run interpreted too. mamba-ssm's SSD and norm kernels do not run in Triton's
interpreter, so they are replaced here by stand-ins with the same signatures and return tuples
(ssd_combined._mamba_chunk_scan_combined_fwd/bwd, layernorm_gated._layer_norm_fwd of mamba-ssm 2.3.2)
computed with megassm's PyTorch reference, writing into the buffers they are given as the real ones do. The
conv and the gated norm's backward are megassm's Triton kernels, interpreted too (tests/triton_interpreter.py). The reference is
the composition the mixer runs on the PyTorch backend; the real kernels are compared on the GPU by
`tools/bench_ssd.py` (check_model) and `tools/bench.py --check`."""

import sys

import pytest
import torch
import torch.utils.checkpoint

from tests.triton_interpreter import run_interpreted


class ReferenceKernels:
    """mamba-ssm's kernel entry points, computed by megassm's PyTorch reference."""

    @staticmethod
    def scan_forward(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, seq_idx=None, dt_softplus=False, dt_limit=None):
        from megassm.ops.ssd import ssd_chunked

        y = ssd_chunked(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, seq_idx=seq_idx)
        return y, None, None, None, None, None  # out, out_x (None without z), dt, dA_cumsum, states, final_states

    @staticmethod
    def scan_backward(dout, x, dt, A, B, C, out, chunk_size, D=None, dt_bias=None, seq_idx=None, dt_softplus=False,
                      dt_limit=None, dx=None, ddt=None, dB=None, dC=None):
        from megassm.ops.ssd import ssd_chunked

        leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
        with torch.enable_grad():  # called from a backward pass
            y = ssd_chunked(*leaves[:5], chunk_size, D=leaves[5], dt_bias=leaves[6], dt_softplus=dt_softplus, dt_limit=dt_limit,
                            seq_idx=seq_idx)
            gx, gdt, gA, gB, gC, gD, gbias = torch.autograd.grad(y, leaves, dout)
        for given, got in ((dx, gx), (ddt, gdt), (dB, gB), (dC, gC)):
            given.copy_(got)
        return dx, ddt, gA, dB, dC, gD, None, gbias, None

    @staticmethod
    def norm_forward(x, weight, bias, eps, z=None, out=None, group_size=None, norm_before_gate=True, is_rms_norm=False):
        """out, mean (None for RMS), and 1/rms of each (row, group) flattened group-major (groups * rows,), the layout
        megassm's gated-norm backward reads."""
        from megassm.ops.norm import gated_rms_norm

        assert bias is None and not norm_before_gate and is_rms_norm
        h = (x * torch.nn.functional.silu(z)).unflatten(-1, (-1, group_size))
        rstd = torch.rsqrt(h.pow(2).mean(-1) + eps).T.reshape(-1)
        return gated_rms_norm(x, z, weight, group_size, eps), None, rstd


class Problem:
    """A mixer's parameters, documents and upstream gradient, with the composed PyTorch reference on them."""

    def __init__(self, batch: int, seqlen: int, boundaries: list[list[int]]):
        from megassm.ops import Mamba2Layout

        torch.manual_seed(0)
        nheads, headdim, ngroups, dstate, width = 4, 8, 2, 32, 4
        self.chunk, self.eps, self.dt_limit = 32, 1e-5, (0.0, float("inf"))
        self.layout = Mamba2Layout(nheads=nheads, headdim=headdim, ngroups=ngroups, d_state=dstate)
        d_inner, conv_dim = nheads * headdim, nheads * headdim + 2 * ngroups * dstate
        self.split = [d_inner, conv_dim, nheads], [d_inner, ngroups * dstate, ngroups * dstate]
        params = {
            "zxbcdt": torch.randn(batch, seqlen, d_inner + conv_dim + nheads), "conv_weight": torch.randn(conv_dim, width) * 0.5,
            "conv_bias": torch.randn(conv_dim), "dt_bias": torch.randn(nheads) * 0.5, "A": -torch.rand(nheads) * 3 - 0.5,
            "D": torch.randn(nheads), "norm_weight": 1 + torch.randn(d_inner) * 0.1,
        }
        self.params = {name: t.requires_grad_() for name, t in params.items()}
        self.seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        for row, starts in enumerate(boundaries):
            for start in starts:
                self.seq_idx[row, start:] += 1
        self.upstream = torch.randn(batch, seqlen, d_inner)

    def composed(self, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight):
        from megassm.ops import causal_conv1d, gated_rms_norm
        from megassm.ops.ssd import ssd_chunked

        layout, (in_proj_split, conv_split) = self.layout, self.split
        z, xBC, dt = zxbcdt.split(in_proj_split, dim=-1)
        x, B, C = causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=self.seq_idx, activation="silu").split(conv_split, dim=-1)
        y = ssd_chunked(x.unflatten(-1, (layout.nheads, layout.headdim)), dt, A, B.unflatten(-1, (layout.ngroups, layout.d_state)),
                        C.unflatten(-1, (layout.ngroups, layout.d_state)), self.chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                        seq_idx=self.seq_idx)
        return gated_rms_norm(y.flatten(-2), z, norm_weight, layout.d_inner // layout.ngroups, self.eps)

    def output_and_grads(self, fn) -> tuple[torch.Tensor, ...]:
        out = fn(*self.params.values())
        return (out, *torch.autograd.grad((out * self.upstream).sum(), list(self.params.values())))


def assert_close_to(got_all, want_all, names) -> None:
    for name, got, want in zip(names, got_all, want_all):
        # Sums over tokens (d(dt_bias), dA) differ by fp32 rounding relative to their largest element, not to each one.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()), msg=name)


def use_interpreted_kernels(segments: int) -> None:
    """megassm's Triton kernels in the interpreter, mamba-ssm's by the reference stand-ins, the walks in `segments`."""
    import megassm.ops.fused_mixer as fused_mixer
    import megassm.ops.ssd_triton_fwd as ssd_triton_fwd
    from tests.triton_interpreter import interpret_ssd_kernels

    fused_mixer.load_triton_kernels = ReferenceKernels
    interpret_ssd_kernels()
    ssd_triton_fwd.walk_segments = lambda batch_heads, nchunks, device: segments


def compare(ssd_kernels: str) -> None:
    import megassm.ops.fused_mixer as fused_mixer

    use_interpreted_kernels(segments=2)  # the walks in segments, as for one long sequence
    problem = Problem(2, 96, [[40], [40, 70]])
    problem.seq_idx += 3 * torch.tensor([[0], [1]], dtype=torch.int32)  # int32 ids are taken as they are: a row need not start at 0
    seq_idx = problem.seq_idx

    def fused(*args, keep_ssd_states: bool = False):
        return fused_mixer.conv_ssd_gated_norm(*args, problem.layout, problem.chunk, problem.dt_limit, problem.eps, seq_idx, ssd_kernels,
                                               keep_ssd_states)

    # megassm's SSD recomputes its states from the state handed to each segment of their walk (`fused`), or keeps its
    # forward's states for the backward (mamba-ssm's recomputes them regardless): here inside activation checkpointing
    # as a block runs it, which keeps those of the forward recomputed in the backward
    kept = lambda *args: fused(*args, keep_ssd_states=True)  # noqa: E731
    kept_in_checkpoint = lambda *args: torch.utils.checkpoint.checkpoint(kept, *args, use_reentrant=False)  # noqa: E731
    variants = (fused,) + (kept_in_checkpoint,) * (ssd_kernels == "megassm")
    want = problem.output_and_grads(problem.composed)
    for fn in variants:
        assert_close_to(problem.output_and_grads(fn), want, ("out", *(f"d{n}" for n in problem.params)))


def compare_context_parallel(cp: int, keep_ssd_states: bool, segments: int) -> None:
    """One rank of cp: the fused mixer on its slice of every row (its conv halo and entering state exchanged with the
    other ranks inside the step), against the composed reference on the whole rows in one process. The walks in
    `segments` (one: the final states from zero by one segment end per walk)."""
    import torch.distributed as dist

    from megassm import ops
    from parallel import send_to_next_rank
    from parallel.collectives import all_gather, all_reduce

    dist.init_process_group("gloo")
    group, rank = dist.group.WORLD, dist.get_rank()
    use_interpreted_kernels(segments)
    # Slices of 80 tokens (kernel chunks of 64: a whole and a partial chunk). Row 0: a document through rank 1's whole
    # slice, another starting inside rank 2's; row 1: documents starting on both slice edges, and one inside.
    problem = Problem(2, 80 * cp, [[170], [80, 130, 160]])
    want = problem.output_and_grads(problem.composed)
    cols = slice(rank * 80, (rank + 1) * 80)
    seq_idx = problem.seq_idx[:, cols].long() + 1000  # global ids, int64: ops converts them
    halo_seq_idx = send_to_next_rank(seq_idx[:, -3:], group)
    mine = {name: (t[:, cols] if name == "zxbcdt" else t).detach().clone().requires_grad_() for name, t in problem.params.items()}

    def fused(*args):
        return ops.conv_ssd_gated_norm(*args, problem.layout, problem.chunk, problem.dt_limit, problem.eps, seq_idx, "megassm",
                                       keep_ssd_states, group, halo_seq_idx)

    out = fused(*mine.values())
    grads = torch.autograd.grad((out * problem.upstream[:, cols]).sum(), list(mine.values()))
    got = [all_gather(out.detach(), group, 1), all_gather(grads[0], group, 1), *(all_reduce(g.clone(), group) for g in grads[1:])]
    assert_close_to(got, want, ("out", *(f"d{n}" for n in problem.params)))


@pytest.mark.parametrize("ssd_kernels", ["megassm", "mamba-ssm"])
def test_fused_mixer_matches_the_composed_reference(ssd_kernels):
    run_interpreted(__file__, ssd_kernels)


@pytest.mark.parametrize("cp, keep_ssd_states, segments", [(2, False, 2), (3, True, 1)])
def test_fused_mixer_under_context_parallelism_matches_one_process(cp, keep_ssd_states, segments):
    run_interpreted(__file__, "cp", str(cp), str(keep_ssd_states), str(segments))


if __name__ == "__main__":
    if sys.argv[1] == "cp":
        from tests.distributed import run_distributed

        run_distributed(compare_context_parallel, int(sys.argv[2]), int(sys.argv[2]), sys.argv[3] == "True", int(sys.argv[4]))
    else:
        compare(sys.argv[1])

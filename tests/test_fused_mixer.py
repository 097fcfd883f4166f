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


def compare(ssd_kernels: str) -> None:
    import megassm.ops.fused_mixer as fused_mixer
    import megassm.ops.ssd_triton_fwd as ssd_triton_fwd
    from tests.triton_interpreter import interpret_ssd_kernels
    from megassm.ops import Mamba2Layout, causal_conv1d, gated_rms_norm
    from megassm.ops.ssd import ssd_chunked

    fused_mixer.load_triton_kernels = ReferenceKernels
    interpret_ssd_kernels()
    ssd_triton_fwd.walk_segments = lambda batch_heads, nchunks, device: 2  # the walks in segments, as for one long sequence
    torch.manual_seed(0)
    batch, seqlen, nheads, headdim, ngroups, dstate, width, chunk = 2, 96, 4, 8, 2, 32, 4, 32
    d_inner, conv_dim, eps, dt_limit = nheads * headdim, nheads * headdim + 2 * ngroups * dstate, 1e-5, (0.0, float("inf"))
    params = {
        "zxbcdt": torch.randn(batch, seqlen, d_inner + conv_dim + nheads), "conv_weight": torch.randn(conv_dim, width) * 0.5,
        "conv_bias": torch.randn(conv_dim), "dt_bias": torch.randn(nheads) * 0.5, "A": -torch.rand(nheads) * 3 - 0.5,
        "D": torch.randn(nheads), "norm_weight": 1 + torch.randn(d_inner) * 0.1,
    }
    params = {name: t.requires_grad_() for name, t in params.items()}
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq_idx[:, 40:] = 1
    seq_idx[1, 70:] = 2
    seq_idx[1] += 3  # int32 ids are taken as they are: a row need not start at document 0

    def composed(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, norm_weight):
        z, xBC, dt = zxbcdt.split([d_inner, conv_dim, nheads], dim=-1)
        x, B, C = causal_conv1d(xBC, conv_weight, conv_bias, seq_idx=seq_idx, activation="silu").split(
            [d_inner, ngroups * dstate, ngroups * dstate], dim=-1)
        y = ssd_chunked(x.unflatten(-1, (nheads, headdim)), dt, A, B.unflatten(-1, (ngroups, dstate)),
                        C.unflatten(-1, (ngroups, dstate)), chunk, D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx)
        return gated_rms_norm(y.flatten(-2), z, norm_weight, d_inner // ngroups, eps)

    def fused(*args, keep_ssd_states: bool = False):
        layout = Mamba2Layout(nheads=nheads, headdim=headdim, ngroups=ngroups, d_state=dstate)
        return fused_mixer.conv_ssd_gated_norm(*args, layout, chunk, dt_limit, eps, seq_idx, ssd_kernels, keep_ssd_states)

    upstream = torch.randn(batch, seqlen, d_inner)
    results = []
    # megassm's SSD recomputes its states from the state handed to each segment of their walk (`fused`), and also keeps
    # its forward's states for the backward (mamba-ssm's recomputes them regardless), also
    # inside activation checkpointing as a block runs it (the states of the forward recomputed in backward are kept)
    kept = lambda *args: fused(*args, keep_ssd_states=True)  # noqa: E731
    recomputed = lambda *args: torch.utils.checkpoint.checkpoint(kept, *args, use_reentrant=False)  # noqa: E731
    variants = (composed, fused) + (kept, recomputed) * (ssd_kernels == "megassm")
    for fn in variants:
        out = fn(*params.values())
        results.append((out, *torch.autograd.grad((out * upstream).sum(), list(params.values()))))
    for got_all in results[1:]:
        for name, got, want in zip(("out", *(f"d{n}" for n in params)), got_all, results[0]):
            # Sums over tokens (d(dt_bias), dA) differ by fp32 rounding relative to their largest element, not to each one.
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(1.0, want.abs().max().item()), msg=name)


@pytest.mark.parametrize("ssd_kernels", ["megassm", "mamba-ssm"])
def test_fused_mixer_matches_the_composed_reference(ssd_kernels):
    run_interpreted(__file__, ssd_kernels)


if __name__ == "__main__":
    compare(sys.argv[1])

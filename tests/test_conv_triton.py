"""megassm's Triton conv1d kernels (megassm/ops/conv_triton.py) against the PyTorch reference, run by
Triton's interpreter on the CPU (tests/triton_interpreter.py), each case in a fresh process.
float32 only: the interpreter has no bf16 (the GPU check is `python tools/bench.py --check`)."""

import sys

import pytest
import torch

from tests.triton_interpreter import run_interpreted

# case: (documents, bias, halo, tokens); one token after a halo is a decoding step (the conv window of Mamba2State)
CASES = {"documents": (True, True, False, 45), "one-document": (False, True, False, 45), "no-bias": (True, False, False, 45),
         "halo": (True, True, True, 45), "halo-one-document": (False, True, True, 45), "halo-one-token": (False, True, True, 1)}


def compare(documents: bool, with_bias: bool, with_halo: bool, seqlen: int, width: int = 4, in_place: bool = True) -> None:
    """Output and the gradients of x (a strided slice, as the mixer passes it), weight, bias and the
    halo (context parallelism's previous rows), with more tokens and channels than one tile of any
    kernel, and not multiples of it; `in_place`: also dx written into a wider buffer, as the fused mixer has it."""
    from megassm.ops import causal_conv1d
    from megassm.ops.conv_triton import causal_conv1d_silu, conv1d_silu_backward

    torch.manual_seed(0)
    batch, channels = 2, 150
    wide = torch.randn(batch, seqlen, channels + 7)
    weight, bias = torch.randn(channels, width), torch.randn(channels) if with_bias else None
    seq_idx = torch.tensor([[0] * 10 + [1] * 3 + [2] * 32, [7] * 31 + [8] * 14]) if documents else None
    # The first sequence's halo ends inside its first document, the second's holds another document.
    halo_seq_idx = torch.tensor([[5] + [0] * (width - 2), [6] * (width - 1)]) if documents else None
    halo_input = torch.randn(batch, width - 1, channels) if with_halo else None
    upstream = torch.randn(batch, seqlen, channels)
    results = []
    for conv in (lambda x, w, b, h: causal_conv1d(x, w, b, halo=h, seq_idx=seq_idx, halo_seq_idx=halo_seq_idx, activation="silu"),
                 lambda x, w, b, h: causal_conv1d_silu(x, w, b, seq_idx, h, halo_seq_idx)):
        x = wide[..., 3:3 + channels].detach().requires_grad_()  # keeps the row stride of `wide`
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_() if with_bias else None
        h = halo_input.clone().requires_grad_() if with_halo else None
        y = conv(x, w, b, h)
        grads = torch.autograd.grad((y * upstream).sum(), [t for t in (x, w, b, h) if t is not None])
        results.append((y, *grads))
    names = ["y", "dx", "dweight"] + ["dbias"] * with_bias + ["dhalo"] * with_halo
    for name, got, want in zip(names, results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    if with_halo or not in_place:
        return

    # As megassm/ops/fused_mixer.py calls it: dx written into its slice of a wider gradient buffer.
    buffer = torch.full_like(wide, float("nan"))
    conv1d_silu_backward(wide[..., 3:3 + channels], weight, bias, seq_idx, upstream, dx=buffer[..., 3:3 + channels])
    torch.testing.assert_close(buffer[..., 3:3 + channels], results[0][1], rtol=1e-5, atol=1e-5, msg="dx in place")
    assert buffer[..., :3].isnan().all() and buffer[..., 3 + channels:].isnan().all(), "wrote outside its slice"


@pytest.mark.parametrize("case", CASES)
def test_triton_conv_matches_the_reference(case):
    run_interpreted(__file__, case)


@pytest.mark.parametrize("options", [False, True], ids=["plain", "bias-documents-halo"])
def test_kernels_compile_for_the_gpu(options, tmp_path, monkeypatch):
    """The interpreter runs the kernels' Python; this compiles them for an H100/H200 (sm_90) down to
    a cubin, which needs no GPU, so that what only the compiler rejects fails here and not on the GPU."""
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    from megassm.ops import conv_triton
    from tools.kernel_registers import compile_sm90

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    flags = dict(HAS_BIAS=options, HAS_SEQ=options, HAS_HALO=options, WIDTH=4)
    kernels = {conv_triton._conv_forward_kernel: conv_triton.FORWARD, conv_triton._conv_backward_kernel: conv_triton.BACKWARD}
    pointer = {"seq_ptr": "*i32", "hseq_ptr": "*i32", "dwb_ptr": "*fp32", "head_ptr": "*fp32"}
    for kernel, launch in kernels.items():
        constants = {**flags, "ROWS": launch.rows, "BLOCK_D": launch.block_d}
        assert compile_sm90(kernel, constants, pointer, options={"num_warps": launch.warps}).asm["cubin"]


if __name__ == "__main__":
    from megassm.ops import conv_triton
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
    compare(*CASES[sys.argv[1]])
    # Several spans per batch row of several blocks each, the last reaching past the end, and blocks of channels with a
    # partial last one: 2-row blocks, 3 blocks of 64 channels, 24 programs aimed at (4 spans of 6 blocks per row at 45
    # tokens); widths 2 and 5.
    conv_triton.FORWARD = conv_triton.BACKWARD = conv_triton.Launch(block_d=64, warps=1, rows=2)
    conv_triton.PROGRAMS = 24
    for width in (2, 5):
        compare(*CASES[sys.argv[1]], width=width, in_place=False)

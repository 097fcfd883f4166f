"""megassm's gated RMSNorm backward kernel (megassm/ops/gated_norm_triton.py) against autograd through the PyTorch
reference (megassm/ops/norm.py), in Triton's interpreter on the CPU (tests/triton_interpreter.py), float32."""

import pytest
import torch

from tests.triton_interpreter import run_interpreted


def compare() -> None:
    """Rows as strided views of wider tensors (as the fused mixer passes in_proj's z and the gradient buffer's dz),
    two groups of 24 channels (tiles of 32, masked), 37 rows over 8 programs (the last one short), each program loading
    its next row ahead or not."""
    from megassm.ops.gated_norm_triton import LaunchShape, gated_norm_backward
    from megassm.ops.norm import gated_rms_norm
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
    torch.manual_seed(0)
    rows, group, groups, eps = 37, 24, 2, 1e-5
    width = group * groups
    wide = torch.randn(rows, 3 * width)
    x, z = wide[:, :width], wide[:, 2 * width:]
    weight, dout = 1 + 0.1 * torch.randn(width), torch.randn(rows, width)
    leaves = [t.clone().requires_grad_() for t in (x, z, weight)]
    want = torch.autograd.grad(gated_rms_norm(*leaves, group, eps), leaves, dout)
    h = (x * torch.nn.functional.silu(z)).unflatten(-1, (groups, group))
    rstd = torch.rsqrt(h.pow(2).mean(-1) + eps).T.reshape(-1)  # (groups * rows,), group-major: mamba-ssm's forward's layout
    for prefetch in (True, False):
        buffer = torch.full((rows, 2 * width), float("nan"))
        dx, dweight = gated_norm_backward(dout, x, z, weight, rstd, group, dz=buffer[:, width:], shape=LaunchShape(1, prefetch, 2))
        for name, got, expected in zip(("dx", "dz", "dweight"), (dx, buffer[:, width:], dweight), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{name}, prefetch {prefetch}")
        assert buffer[:, :width].isnan().all(), "dz written outside its slice"


def test_gated_norm_backward_matches_autograd_of_the_reference():
    run_interpreted(__file__)


@pytest.mark.parametrize("group", [24, 3072, 5120])
def test_the_kernel_compiles_for_the_gpu(group, tmp_path, monkeypatch):
    """Compiled for sm_90 (no GPU needed) at launch_shape's choice: what only the compiler rejects fails here.
    3072: 780m's group, 5120: 2.7b's."""
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    import triton

    from megassm.ops.gated_norm_triton import _gated_norm_backward_kernel, launch_shape
    from tools.kernel_registers import compile_sm90

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    block = triton.next_power_of_2(group)
    pointers = {"rstd_ptr": "*fp32", "w_ptr": "*fp32", "dw_ptr": "*fp32"}
    shape = launch_shape(block)
    assert compile_sm90(_gated_norm_backward_kernel, {"BLOCK_N": block, "PREFETCH": shape.prefetch}, pointers,
                        options={"num_warps": shape.warps}).asm["cubin"]


if __name__ == "__main__":
    compare()

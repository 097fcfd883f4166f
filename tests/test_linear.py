"""parallel/linear.py against F.linear on the concatenated weight: outputs and every gradient, with and without
autocast, and the loss head's fp32 accumulation of matmuls."""

import pytest
import torch
import torch.nn.functional as F

from parallel.linear import add_matmul_, linear


def _segments(dtype=torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(rows, 24, dtype=dtype, requires_grad=True) for rows in (8, 16, 5)]


def _run(fn, x, weights, bias, dy):
    x = x.detach().clone().requires_grad_()
    weights = [w.detach().clone().requires_grad_(w.requires_grad) for w in weights]
    bias = None if bias is None else bias.detach().clone().requires_grad_()
    y = fn(x, weights, bias)
    wanted = [t for t in (x, *weights, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy.to(y.dtype))
    return y, grads


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_f_linear_in_fp64(with_bias):
    weights = [w.double() for w in _segments()]
    x, dy = torch.randn(2, 7, 24, dtype=torch.float64), torch.randn(2, 7, 29, dtype=torch.float64)
    bias = torch.randn(29, dtype=torch.float64) if with_bias else None
    got = _run(linear, x, weights, bias, dy)
    want = _run(lambda x, ws, b: F.linear(x, torch.cat(ws), b), x, weights, bias, dy)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[1], want[1], strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_linear_under_autocast_gives_fp32_weight_gradients_as_f_linear():
    """bf16 compute on fp32 weights: the output in bf16, dx in x's dtype, the weights' gradients in fp32 and as F.linear's
    under autocast (both round the matmul to bf16 on a CPU); a frozen segment gets none."""
    weights = _segments()
    weights[1].requires_grad_(False)
    x, dy = torch.randn(3, 24), torch.randn(3, 29)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(linear, x, weights, None, dy)
        want = _run(lambda x, ws, b: F.linear(x, torch.cat(ws)), x, weights, None, dy)
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert [g.dtype for g in got[1]] == [torch.float32] * 3 and len(got[1]) == 3  # x and the two trained segments
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)


def test_add_matmul_adds_the_product_in_place():
    torch.manual_seed(0)
    acc = torch.randn(6, 5, dtype=torch.float64)
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    want = acc + a @ b
    assert add_matmul_(acc, a, b) is acc
    torch.testing.assert_close(acc, want, rtol=1e-12, atol=1e-12)

"""parallel/adamw_triton.py's TritonAdamW against torch's fused AdamW (the contract it keeps: math, state, skipped
steps), the kernel run by Triton's interpreter on the CPU (tests/triton_interpreter.py)."""

import sys

import pytest
import torch

from tests.triton_interpreter import run_interpreted


def compare(device: str = "cpu") -> None:
    """On `device` (the CPU: the interpreter; "cuda": the compiled kernel against torch's CUDA kernel). Two groups (with
    and without weight decay) of tensors smaller than, equal to and a little larger than a block, one parameter without
    a gradient, the second group with sizes not all a multiple of 4 (6 heads' A_log); steps with gradients scaled
    (clipping), one skipped (found_inf), one plain; gradients allocated anew each step (the pointer table rebuilt) and
    kept (reused)."""
    from parallel.adamw_triton import BLOCK, TritonAdamW
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
    TritonAdamW.KERNEL_DEVICES = ("cuda", "cpu")
    torch.manual_seed(0)
    shapes = [(BLOCK + 4,), (7, 4), (4,), (BLOCK,), (2, BLOCK // 2 + 2), (6,), (BLOCK + 5,)]
    start = [torch.randn(shape, device=device) for shape in shapes]

    def build(cls, **kwargs):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]
        return params, cls(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, **kwargs)

    ours, our_opt = build(TritonAdamW)
    theirs, their_opt = build(torch.optim.AdamW, fused=True)
    scales = [torch.tensor(2.5, device=device), torch.tensor(1.0, device=device), None, None]
    skips = [torch.tensor(0.0, device=device), torch.tensor(1.0, device=device), torch.tensor(0.0, device=device), None]
    for step, (scale, skip) in enumerate(zip(scales, skips)):
        grads = [torch.randn(shape, device=device) for shape in shapes]
        for params in (ours, theirs):
            for i, (p, g) in enumerate(zip(params, grads)):
                if i == 2:  # no gradient: not updated, no state
                    continue
                if step == 3 and p.grad is not None:
                    p.grad.copy_(g)  # the same buffers as the step before
                else:
                    p.grad = g.clone()
        for opt in (our_opt, their_opt):
            opt.grad_scale, opt.found_inf = scale, skip
            opt.step()
        assert all(table is not None for table in our_opt._tables.values()), "a group stepped as torch's fused AdamW"
        for i, (p, g) in enumerate(zip(ours, grads)):  # gradients left as they were (torch's step unscales them in place)
            assert i == 2 or torch.equal(p.grad, g), f"step {step + 1}: gradient {i} changed"
        for i, (mine, want) in enumerate(zip(ours, theirs)):
            torch.testing.assert_close(mine.data, want.data, rtol=1e-6, atol=1e-7, msg=f"step {step + 1}, parameter {i}")
        for i, (mine, want) in enumerate(zip(our_opt.state_dict()["state"].values(), their_opt.state_dict()["state"].values())):
            for key in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(mine[key], want[key], rtol=1e-6, atol=1e-7, msg=f"step {step + 1}, state {i} {key}")
        assert 2 not in our_opt.state_dict()["state"]
    assert len(our_opt._tables) >= 2  # rebuilt for new gradients, reused for kept ones

    # Where the kernel does not apply (bf16 parameters), torch's fused step runs.
    params = [torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16, device=device))]
    opt = TritonAdamW([{"params": params, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    params[0].grad = torch.ones(8, dtype=torch.bfloat16, device=device)
    before = params[0].detach().clone()
    opt.step()
    assert list(opt._tables.values()) == [None] and not torch.equal(params[0], before)


def test_triton_adamw_matches_torch_fused_adamw():
    run_interpreted(__file__)


def test_adamw_kernel_compiles_for_the_gpu(tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    from parallel.adamw_triton import BLOCK, _adamw_kernel
    from tools.kernel_registers import compile_sm90

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pointers = {name: "*i64" for name in ("table_ptr", "tensor_of_block_ptr", "first_block_ptr")} | {
        "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    for name in ("lr", "beta1", "beta2", "eps", "weight_decay"):
        pointers[name] = "fp32"
    for sizes_by_4 in (True, False):
        constants = {"HAS_SCALE": True, "HAS_FOUND_INF": True, "BLOCK": BLOCK, "SIZES_BY_4": sizes_by_4}
        assert compile_sm90(_adamw_kernel, constants, pointers, options={"num_warps": 8}).asm["cubin"]


if __name__ == "__main__":
    compare(*sys.argv[1:])

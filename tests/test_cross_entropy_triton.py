"""The chunked loss through its Triton kernel (parallel/cross_entropy_triton.py) against the full logits' cross-entropy
in float64, in Triton's interpreter on the CPU (tests/triton_interpreter.py), float32."""

import pytest
import torch

from tests.triton_interpreter import run_interpreted


def compare() -> None:
    """A vocabulary of 4,500 (three loop steps of 2,048, the last one partial), three chunks of 16 tokens (the last
    of 8), ignored targets; the loss, and the gradients of its mean w.r.t. the hidden states and the weight."""
    from parallel import ParallelContext, vocab_parallel_linear_cross_entropy
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
    torch.manual_seed(0)
    vocab, width = 4500, 24
    h, weight = torch.randn(2, 20, width) * 2, torch.randn(vocab, width)
    target = torch.randint(0, vocab, (2, 20))
    target[0, 3] = target[1, 17] = -100

    def run(loss_fn, dtype):
        leaves = [h.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()]
        losses = loss_fn(*leaves)
        return losses, *torch.autograd.grad(losses.sum() / (target != -100).sum(), leaves)

    def reference(h, w):
        logits = h @ w.T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)

    want = run(reference, torch.float64)
    got = run(lambda h, w: vocab_parallel_linear_cross_entropy(h, w, target, ParallelContext(), chunk_tokens=16, triton=True),
              torch.float32)
    for name, g, w in zip(("losses", "dh", "dweight"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6, msg=name)
    assert (got[0][target == -100] == 0).all()


def test_triton_loss_matches_the_full_logits_in_float64():
    run_interpreted(__file__)


def test_the_kernel_compiles_for_the_gpu(tmp_path, monkeypatch):
    """Compiled for sm_90 with bf16 logits, as training runs it (no GPU needed)."""
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    from parallel import cross_entropy_triton as ce
    from tools.kernel_registers import compile_sm90

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pointers = {"target_ptr": "*i64", "hit_ptr": "*i1", "scale_ptr": "*fp32", "lse_ptr": "*fp32", "target_logit_ptr": "*fp32"}
    assert compile_sm90(ce._loss_and_grad_kernel, {"BLOCK_V": ce.BLOCK_V, "FAR_BELOW": ce.FAR_BELOW}, pointers,
                        options={"num_warps": ce.NUM_WARPS}).asm["cubin"]


if __name__ == "__main__":
    compare()

"""megassm/ops/column_sums.py (the backward kernels' partial sums summed over their rows) against torch's sum in
float64, in Triton's interpreter on the CPU (tests/triton_interpreter.py), and compiled for an H200."""

import pytest
import torch

from tests.triton_interpreter import run_interpreted


def compare() -> None:
    """Rows and columns that are not multiples of the blocks (the last block of each masked), a partial sum per program
    shaped (rows, a, b) as the SSD's, the result in fp32 and cast to bf16; other partial sums refused by name."""
    from megassm.ops.column_sums import BLOCK_COLUMNS, BLOCK_ROWS, column_sums
    from tests.triton_interpreter import patch_interpreter

    patch_interpreter()
    torch.manual_seed(0)
    partial = torch.randn(2 * BLOCK_ROWS + 5, 3, BLOCK_COLUMNS // 2 + 7)
    want = partial.double().sum(0)
    torch.testing.assert_close(column_sums(partial).double(), want, rtol=1e-6, atol=1e-5)
    assert column_sums(partial, torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(column_sums(partial, torch.bfloat16).double(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(column_sums(partial[:1]), partial[0], rtol=0, atol=0)
    for wrong in (partial.double(), partial.transpose(1, 2)):
        with pytest.raises(ValueError, match="contiguous fp32 partial sums"):
            column_sums(wrong)


def test_column_sums_match_torch():
    run_interpreted(__file__)


def test_column_sums_compile_for_the_gpu(tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    from megassm.ops.column_sums import BLOCK_COLUMNS, BLOCK_ROWS, _column_sums_kernel
    from tools.kernel_registers import compile_sm90

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    pointers = {"partial_ptr": "*fp32", "out_ptr": "*bf16"}
    assert compile_sm90(_column_sums_kernel, {"BLOCK_R": BLOCK_ROWS, "BLOCK_C": BLOCK_COLUMNS}, pointers).asm["cubin"]


if __name__ == "__main__":
    compare()

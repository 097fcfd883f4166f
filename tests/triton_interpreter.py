"""Running megassm's Triton kernels in Triton's CPU interpreter: the kernel source the GPU compiles, executed with
numpy per program. The interpreter is chosen when @triton.jit runs and also applies to triton's own library
functions, so each case runs in a fresh process with TRITON_INTERPRET=1 set before triton is imported."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, *args: str) -> None:
    """`python script args` with Triton's interpreter on; fails the test with the script's output if it fails."""
    pytest.importorskip("triton", reason="the dev extra installs triton on Linux; elsewhere: pip install triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def interpret_runtime_loop_bounds() -> None:
    """Triton 3.6's interpreter holds scalar arguments as 1-element arrays and takes a loop bound with int(array),
    which numpy >= 2.4 refuses for arrays of one dimension: read the bound with .item() (call before kernels run)."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched


def interpret_ssd_kernels() -> None:
    """Patch what Triton 3.6's interpreter cannot do for megassm/ops/ssd_triton*.py, before they run: runtime loop
    bounds (over chunks and heads; interpret_runtime_loop_bounds), and timing autotuning configurations: each
    kernel keeps its first, with d_state in blocks of 16 (the tests' d_state of 32 then takes two: the loops and
    grids over d_state blocks run)."""
    import triton

    from megassm.ops import ssd_triton_bwd, ssd_triton_fwd

    interpret_runtime_loop_bounds()
    for kernel in (ssd_triton_fwd._states_kernel, ssd_triton_fwd._segment_ends_kernel, ssd_triton_fwd._output_kernel,
                   ssd_triton_bwd._state_grads_kernel, ssd_triton_bwd._head_grads_kernel, ssd_triton_bwd._group_grads_kernel):
        first = kernel.configs[0]
        kwargs = {key: 16 if key == "BLOCK_N" else value for key, value in first.kwargs.items()}
        kernel.configs = [triton.Config(kwargs, num_warps=first.num_warps, num_stages=first.num_stages)]

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


def patch_interpreter() -> None:
    """What Triton 3.6's interpreter needs before megassm's kernels run in it (call before they do):
    - runtime loop bounds: it holds scalar arguments as 1-element arrays and takes a loop bound with int(array), which
      numpy >= 2.4 refuses for arrays of one dimension: read the bound with .item();
    - a @triton.jit helper called from a kernel patches triton.language again on every call (inspecting each of its
      members, a fifth of an SSD test's time), though the launch around it has patched it already: skip that."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched_tensor

    patch_lang, patched_modules = interpreter._patch_lang, set()

    def patch_lang_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if patched_modules and langs <= patched_modules:  # a helper inside a launch: nothing left to patch
            return interpreter._LangPatchScope()
        scope = patch_lang(fn)
        patched_modules.update(langs)
        restore = scope.restore

        def restore_all() -> None:  # the launch ends
            patched_modules.clear()
            restore()

        scope.restore = restore_all
        return scope

    interpreter._patch_lang = patch_lang_once


def interpret_ssd_kernels(block_n: int | None = 16) -> None:
    """Patch what Triton 3.6's interpreter cannot do for megassm/ops/ssd_triton*.py, before they run: runtime loop
    bounds (over chunks and heads) and helpers (patch_interpreter), and timing autotuning configurations: each
    kernel keeps its first, with d_state in blocks of `block_n` (16: the tests' d_state of 32 then takes two, so the
    loops and grids over d_state blocks run; None: the configuration's own, as on the GPU)."""
    import triton

    from megassm.ops import ssd_triton_bwd, ssd_triton_fwd

    patch_interpreter()
    for kernel in (ssd_triton_fwd._states_kernel, ssd_triton_fwd._segment_ends_kernel, ssd_triton_fwd._output_kernel,
                   ssd_triton_bwd._state_grads_kernel, ssd_triton_bwd._head_grads_kernel, ssd_triton_bwd._group_grads_kernel):
        first = kernel.configs[0]
        kwargs = {key: block_n if key == "BLOCK_N" and block_n else value for key, value in first.kwargs.items()}
        kernel.configs = [triton.Config(kwargs, num_warps=first.num_warps, num_stages=first.num_stages)]

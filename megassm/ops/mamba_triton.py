"""mamba-ssm's Triton kernels (SSD and the gated RMSNorm), loaded without `mamba_ssm/__init__.py`.

Why: mamba-ssm's package `__init__` imports Mamba-1's compiled `selective_scan_cuda` unconditionally.
An install without CUDA builds (`MAMBA_SKIP_CUDA_BUILD=TRUE`: a 0.2 MB pure-Python wheel) therefore
cannot even be imported, although the Triton kernels we use need nothing compiled. When the normal
import fails we register bare package modules for `mamba_ssm`, `mamba_ssm.ops`,
`mamba_ssm.ops.triton` and `mamba_ssm.utils` (their real `__path__`, no `__init__` executed), so the
kernel modules' absolute imports resolve to the installed files. A complete mamba-ssm install is
imported the ordinary way and left untouched.

These kernels' and megassm's SSD kernels' autotuning choices are restored from, and recorded at exit to, megassm's disk cache
(megassm/ops/autotune_cache.py), so a run on a machine that has seen the shapes tunes nothing.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import os
import sys
import types
import warnings
from typing import Callable, NamedTuple

from megassm.ops import autotune_cache


class TritonKernels(NamedTuple):
    mamba_chunk_scan_combined: Callable
    rmsnorm_fn: Callable
    # The halves of both: the scan's and the norm's forward for megassm/ops/fused_mixer.py (the scan's backward too,
    # with kernels.ssd = "mamba-ssm"), taking the buffers to write gradients into, so one mixer's gradients land in
    # one tensor; the norm's backward as tools/bench_norm.py's peer.
    scan_forward: Callable
    scan_backward: Callable
    norm_forward: Callable
    norm_backward: Callable


# The kernels compute offsets into a tensor in 32-bit integers: no tensor they touch may hold this many elements.
TRITON_MAX_ELEMENTS = 2**31


class KernelsUnavailable(RuntimeError):
    """The Triton path cannot run here; the message says why and what to install."""


_KERNEL_MODULES = ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.layernorm_gated")
_BARE_PACKAGES = ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils")


def _register_bare_packages() -> None:
    spec = importlib.util.find_spec("mamba_ssm")
    root = os.path.dirname(spec.origin)
    for name in _BARE_PACKAGES:
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(root, *name.split(".")[1:])]
        sys.modules[name] = module


def _import_kernel_modules() -> list[types.ModuleType]:
    try:
        return [importlib.import_module(name) for name in _KERNEL_MODULES]
    except ImportError:
        # Typically "No module named 'selective_scan_cuda'" from the package __init__.
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]
        _register_bare_packages()
        return [importlib.import_module(name) for name in _KERNEL_MODULES]


def _record_autotuning() -> None:
    try:
        autotune_cache.record()
    except OSError as error:  # a read-only or full disk costs the next run its tuning time, nothing else
        warnings.warn(f"could not record the Triton autotuning choices: {error}", stacklevel=1)


@functools.cache
def load_triton_kernels() -> TritonKernels:
    """The kernels, or KernelsUnavailable naming what is missing."""
    for package, hint in (
        ("triton", "pip install triton (it comes with CUDA builds of torch)"),
        ("mamba_ssm", "MAMBA_SKIP_CUDA_BUILD=TRUE pip install 'megassm[gpu]' (no CUDA compile needed)"),
    ):
        if importlib.util.find_spec(package) is None:
            raise KernelsUnavailable(f"the Triton SSD path needs the package '{package}': {hint}")
    try:
        ssd_combined, layernorm_gated = _import_kernel_modules()
    except ImportError as error:
        raise KernelsUnavailable(f"mamba-ssm's Triton kernels failed to import: {error}") from error
    importlib.import_module("megassm.ops.ssd_triton")  # megassm's SSD kernels: their autotuners get their choices too
    autotune_cache.restore()
    atexit.register(_record_autotuning)
    return TritonKernels(ssd_combined.mamba_chunk_scan_combined, layernorm_gated.rmsnorm_fn,
                         ssd_combined._mamba_chunk_scan_combined_fwd, ssd_combined._mamba_chunk_scan_combined_bwd,
                         layernorm_gated._layer_norm_fwd, layernorm_gated._layer_norm_bwd)

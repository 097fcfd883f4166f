"""Registers, spills, shared memory and instructions of megassm's SSD Triton kernels on an H100/H200 (sm_90), compiled on
the CPU.

    python tools/kernel_registers.py [--kernels _head_grads_kernel ...] [--config BLOCK_N=32,num_warps=8,maxnreg=128]

Why: the chunk-parallel SSD kernels are latency-bound at two programs per SM, held there by registers and shared
memory (bench/RESULTS.md, Nsight Compute on the H200). Triton compiles a kernel to PTX without a GPU and ptxas
reports what one program of it needs, nvdisasm how many instructions it issues: a change's effect on occupancy and on
the instructions to issue is seen here before any device time is spent.
Shapes: 780m's layer (headdim 64, d_state 128), megassm's internal chunk; every autotuning configuration of each
kernel, or the --config given.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # triton is imported only where it is used
    import triton
    from triton.compiler import CompiledKernel
    from triton.runtime import Autotuner

SM90_REGISTERS, SM90_SHARED_KIB = 65536, 227  # per SM: an H100/H200's register file and shared memory for programs


def compile_sm90(kernel: triton.JITFunction, constexprs: dict, pointer_types: dict[str, str], options: dict | None = None,
                 aligned: bool = False) -> CompiledKernel:
    """`kernel` (a @triton.jit function) compiled for sm_90 with these constexprs; pointers are bf16 unless
    `pointer_types` names them (it may name other arguments' types too), other arguments i32 (fp32 for dt_min and
    dt_max). Needs no GPU. `aligned`: every pointer and integer argument divisible by 16, as Triton specializes them at
    a launch where they are (at 780m's shapes nearly all are): wider loads and deeper pipelining, hence more shared
    memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else pointer_types[name] if name in pointer_types else
                 "*bf16" if name.endswith("_ptr") else "fp32" if name in ("dt_min", "dt_max") else "i32" for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if aligned and signature[name] not in ("constexpr", "fp32")}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or {})


SSD_POINTERS = {name: "*fp32" for name in ("dt_ptr", "cs_ptr", "dt_out_ptr", "cs_out_ptr", "init_ptr", "final_ptr", "dfinal_ptr",
                                           "dinit_ptr", "A_ptr", "D_ptr", "bias_ptr", "part_ptr",
                                           "slope_ptr", "slope_out_ptr", "ends_ptr", "carries_ptr", "start_ptr")}
SSD_POINTERS["seq_ptr"] = "*i32"
SSD_CONSTANTS = dict(P=64, N=128, BLOCK_P=64, BLOCK_N=128, HAS_SEQ=True, WHOLE=True, HAS_D=True, D_PER_CHANNEL=False, HAS_BIAS=True,
                     SOFTPLUS=True, HAS_INIT=True, HAS_DFINAL=True, SEGMENTED=False, REVERSE=False)


def ssd_autotuners() -> dict:
    """The SSD's autotuned kernels by name."""
    from megassm.ops import ssd_triton_bwd, ssd_triton_fwd

    return {name: getattr(module, name) for module, names in (
        (ssd_triton_fwd, ("_states_kernel", "_segment_ends_kernel", "_output_kernel")),
        (ssd_triton_bwd, ("_state_grads_kernel", "_head_grads_kernel", "_group_grads_kernel"))) for name in names}


def compile_ssd_kernel(tuner: Autotuner, config: dict) -> CompiledKernel:
    """One SSD kernel at 780m's shapes and megassm's chunk, under one configuration (tile constexprs and num_warps,
    num_stages, maxnreg)."""
    from megassm.ops.ssd_triton import DEFAULT_KERNEL_CHUNK

    options = {k: v for k, v in config.items() if k.startswith("num_") or k == "maxnreg"}
    constants = {k: v for k, v in {**SSD_CONSTANTS, "Q": DEFAULT_KERNEL_CHUNK}.items() if k in tuner.fn.arg_names}
    return compile_sm90(tuner.fn, {**constants, **{k: v for k, v in config.items() if k not in options}}, SSD_POINTERS, options,
                        aligned=True)


def ptxas_report(ptx: str) -> dict:
    """ptxas -v on the PTX (what Triton's own ptxas call does not print): registers, spill bytes."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.ptx")
        path.write_text(ptx)
        log = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(path), "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(registers.group(1)) if registers else None, "spill_stores": int(spills.group(1)) if spills else 0,
            "spill_loads": int(spills.group(2)) if spills else 0}


def sass_instructions(cubin: bytes) -> int:
    """Instructions in the kernel's machine code (nvdisasm): the chunk-parallel SSD kernels are issue-bound and have
    no loop but over d_state blocks, so this tracks the instructions a warp issues (Nsight Compute: ~4,000 per warp
    of `_head_grads_kernel`, 3,728 here)."""
    import triton

    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "kernel.cubin")
        path.write_bytes(cubin)
        listing = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in listing.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line))


def programs_per_sm(registers: int, warps: int, shared_bytes: int) -> int:
    """How many programs fit on one SM at once by registers and by shared memory (the tighter)."""
    by_registers = SM90_REGISTERS // (registers * warps * 32)
    by_shared = SM90_SHARED_KIB * 1024 // shared_bytes if shared_bytes else by_registers
    return min(by_registers, by_shared)


def parse_config(text: str) -> dict:
    config = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        config[key.strip()] = int(value)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", help="kernel names (default: the SSD's five autotuned kernels)")
    parser.add_argument("--config", action="append", default=[], type=parse_config,
                        help="instead of the autotuning lists, e.g. BLOCK_N=32,num_warps=8,num_stages=2,maxnreg=128")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="kernel_registers_"))
    tuners = ssd_autotuners()
    unknown = set(args.kernels or ()) - set(tuners)
    if unknown:
        print(f"unknown kernels {sorted(unknown)}: choose from {sorted(tuners)}")
        return 2
    print(f"{'kernel':<22}{'configuration':<58}{'registers':>10}{'spills st/ld':>14}{'shared KiB':>11}{'programs/SM':>12}"
          f"{'instructions':>13}")
    for name in args.kernels or tuners:
        tuner = tuners[name]
        configs = args.config or [{k: v for k, v in c.all_kwargs().items() if v is not None} for c in tuner.configs]
        for config in configs:
            config = {"num_warps": 4, "num_stages": 1, **config}
            compiled = compile_ssd_kernel(tuner, config)
            report = ptxas_report(compiled.asm["ptx"])
            shared = compiled.metadata.shared
            per_sm = programs_per_sm(report["registers"], config["num_warps"], shared)
            described = ", ".join(f"{k}={v}" for k, v in config.items() if k != "num_ctas")
            print(f"{name:<22}{described:<58}{report['registers']:>10}{report['spill_stores']:>7}/{report['spill_loads']:<6}"
                  f"{shared / 1024:>11.1f}{per_sm:>12}{sass_instructions(compiled.asm['cubin']):>13}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

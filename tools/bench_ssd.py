"""SSD and the Mamba-2 mixer on the GPU: mamba-ssm's Triton kernels against megassm's PyTorch reference.

Accuracy: every result (outputs, final states, the gradient of every input) is compared with the
PyTorch reference computed in float64 on the same inputs, as max|got - want| / max|want|. The Triton
path must stay within the budget of its input precision (fp32: TF32 tensor-core dots; bf16); the
PyTorch reference run in the same precision is printed beside it for scale.
Speed: forward + backward time and peak memory of both, same inputs, same process.

    python tools/bench_ssd.py [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable

import torch

from megassm import ops
from megassm.model import Mamba2LM, ModelConfig, apply_kernels
from megassm.ops.layout import Mamba2Layout
from megassm.ops.ssd import ssd_chunked


def preset_layout(preset: str, **overrides: int) -> Mamba2Layout:
    """The channels of one Mamba-2 layer of a megassm preset (model.preset), e.g. with ngroups overridden."""
    return dataclasses.replace(ModelConfig.from_preset(preset).mamba_layout(), **overrides)


def layer_shape(preset: str, batch: int, seqlen: int, **overrides: int) -> dict[str, int]:
    """The SSD operands' shape in one Mamba-2 layer of a preset (preset_layout)."""
    layout = preset_layout(preset, **overrides)
    return dict(batch=batch, seqlen=seqlen, nheads=layout.nheads, headdim=layout.headdim, ngroups=layout.ngroups, dstate=layout.d_state)


# The 130m model's layer at batch 8 x 2048 tokens, and one long 780m sequence with 8 groups.
TIMED = [
    (layer_shape("mamba2-130m", 8, 2048), torch.bfloat16),
    (layer_shape("mamba2-130m", 8, 2048), torch.float32),
    (layer_shape("mamba2-780m", 1, 32768, ngroups=8), torch.bfloat16),
]
BUDGET = {torch.float32: 5e-3, torch.bfloat16: 3e-2}
INPUTS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|; inf where either holds a NaN or an infinity (max() would drop a NaN)."""
    got, want = got.detach().double(), want.detach().double()
    error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    return error if math.isfinite(error) else math.inf


def make_ssd_inputs(batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int, dstate: int, boundaries: tuple[int, ...],
                    device: torch.device, dt_shift: float = -2.0, A_range: tuple[float, float] = (1.0, 16.0),
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """float64 SSD inputs (dt before softplus, shifted by dt_shift; -A uniform in A_range) and the
    document ids of `boundaries` (every row), or None without boundaries."""
    g = torch.Generator(device=device).manual_seed(0)
    f64 = dict(dtype=torch.float64, device=device, generator=g)
    inputs = {
        "x": torch.randn(batch, seqlen, nheads, headdim, **f64),
        "dt": torch.randn(batch, seqlen, nheads, **f64) + dt_shift,
        "A": -torch.rand(nheads, **f64) * (A_range[1] - A_range[0]) - A_range[0],
        "B": torch.randn(batch, seqlen, ngroups, dstate, **f64),
        "C": torch.randn(batch, seqlen, ngroups, dstate, **f64),
        "D": torch.randn(nheads, **f64),
        "dt_bias": torch.randn(nheads, **f64) * 0.5,
        "initial_states": torch.randn(batch, nheads, headdim, dstate, **f64),
    }
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32, device=device)
    for position in boundaries:
        seq_idx[:, position:] += 1
    return inputs, (seq_idx if boundaries else None)


def input_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Activations (x, B, C) in the compute precision; dt, parameters and states in fp32 (or fp64)."""
    if name in ("x", "B", "C") or dtype == torch.float64:
        return dtype
    return torch.float32


def run_ssd(inputs: dict[str, torch.Tensor], seq_idx: torch.Tensor | None, chunk_size: int, backend: str, dtype: torch.dtype,
            cotangents: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs and input gradients of one SSD call in `dtype` (x, B, C, initial_states; dt in fp32)."""
    leaves = {name: t.to(input_dtype(name, dtype)).requires_grad_(True) for name, t in inputs.items()}
    fn = ssd_chunked if backend == "reference" else (lambda *a, **k: ops.ssd(*a, backend=backend, **k))
    y, final = fn(**leaves, chunk_size=chunk_size, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
    dy, dfinal = cotangents
    grads = torch.autograd.grad((y * dy.to(y.dtype)).sum() + (final * dfinal.to(final.dtype)).sum(), [leaves[n] for n in INPUTS])
    return {"y": y, "final_states": final, **{f"d{n}": g for n, g in zip(INPUTS, grads)}}


def check_ssd(cases: list[dict], device: torch.device) -> list[dict]:
    rows = []
    for case in cases:
        inputs, seq_idx = make_ssd_inputs(**case["shape"], boundaries=case["boundaries"], device=device)
        b, l, h, p = inputs["x"].shape
        g = torch.Generator(device=device).manual_seed(1)
        cotangents = (torch.randn(b, l, h, p, device=device, generator=g, dtype=torch.float64),
                      torch.randn(b, h, p, inputs["B"].shape[-1], device=device, generator=g, dtype=torch.float64))
        exact = run_ssd(inputs, seq_idx, case["chunk_size"], "reference", torch.float64, cotangents)
        for dtype in (torch.float32, torch.bfloat16):
            triton = run_ssd(inputs, seq_idx, case["chunk_size"], "triton", dtype, cotangents)
            torch_ref = run_ssd(inputs, seq_idx, case["chunk_size"], "torch", dtype, cotangents)
            for name in exact:
                err_triton, err_torch = relative_error(triton[name], exact[name]), relative_error(torch_ref[name], exact[name])
                rows.append({"case": case["name"], "dtype": str(dtype).removeprefix("torch."), "tensor": name,
                             "triton": err_triton, "torch": err_torch, "ok": err_triton <= BUDGET[dtype]})
    return rows


def check_model(device: torch.device, precisions: tuple[str, ...] = ("fp32", "bf16")) -> list[dict]:
    """Whole LM forward + backward (2 layers of 130m's width), Triton path vs the reference path, eager."""
    rows = []
    cfg = ModelConfig.from_preset("mamba2-130m", n_layer=2, ngroups=2)
    torch.manual_seed(0)
    models = {backend: Mamba2LM(cfg).to(device) for backend in ("torch", "triton")}
    for backend, model in models.items():
        apply_kernels(model, backend)
    models["triton"].load_state_dict(models["torch"].state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 1000), device=device)
    seq_idx = torch.zeros_like(ids, dtype=torch.int32)
    seq_idx[:, 300:] += 1
    seq_idx[:, 777:] += 1
    results = {}
    for precision in precisions:
        for backend, model in models.items():
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(ids, seq_idx=seq_idx)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
            loss.backward()
            results[precision, backend] = {"logits": logits.detach().float(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
        for name, want in results[precision, "torch"].items():
            err = relative_error(results[precision, "triton"][name], want)
            rows.append({"case": "Mamba2LM 2x768 G2 3 docs: Triton vs PyTorch path", "dtype": precision, "tensor": name, "triton": err, "torch": None,
                         "ok": err <= BUDGET[torch.bfloat16 if precision == "bf16" else torch.float32] * (4 if name != "logits" else 1)})
    return rows


def launch_ms(fn: Callable[[], object], launches: int, warmup: int = 3) -> float:
    """Milliseconds of GPU time per call of fn: CUDA events around `launches` calls back to back, after `warmup`
    calls (compiling, autotuning). Timing each call alone would count the host's launch time of short kernels."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / launches


def time_ssd(shape: dict[str, int], dtype: torch.dtype, chunk_size: int, device: torch.device, repeats: int) -> list[dict]:
    """Forward + backward milliseconds and peak memory of one SSD call, Triton vs the reference."""
    rows = []
    inputs, _ = make_ssd_inputs(**shape, boundaries=(), device=device)
    for backend in ("triton", "torch"):
        leaves = {n: t.to(input_dtype(n, dtype)).requires_grad_(True) for n, t in inputs.items() if n != "initial_states"}

        def step() -> None:
            y = ops.ssd(**leaves, chunk_size=chunk_size, backend=backend)
            y.backward(torch.ones_like(y))

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = launch_ms(step, repeats, warmup=0)
        rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
                     "ms": ms, "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30})
        s = shape
        print(f"| b{s['batch']} L{s['seqlen']} H{s['nheads']} P{s['headdim']} N{s['dstate']} G{s['ngroups']} | {rows[-1]['dtype']} | {backend} | "
              f"{rows[-1]['ms']:.2f} | {rows[-1]['peak_gib']:.2f} |", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--json", help="also write all rows to this file")
    parser.add_argument("--skip-accuracy", action="store_true", help="timings only")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {__import__('triton').__version__}")
    ops.load_triton_kernels()

    cases = [
        {"name": "b2 L1000 H8 G2 Q256, 3 docs, init state", "shape": dict(batch=2, seqlen=1000, nheads=8, headdim=64, ngroups=2, dstate=64), "chunk_size": 256, "boundaries": (100, 512, 700)},
        {"name": "b1 L333 H4 G1 Q64, doc on chunk edge", "shape": dict(batch=1, seqlen=333, nheads=4, headdim=32, ngroups=1, dstate=128), "chunk_size": 64, "boundaries": (128,)},
    ]
    if args.quick:
        cases = cases[:1]
    accuracy = [] if args.skip_accuracy else check_ssd(cases, device) + check_model(device)
    if accuracy:
        print("\n## Accuracy (max abs error / max abs of the float64 reference; model rows: Triton vs PyTorch path)\n")
        print("| case | dtype | tensor | Triton | PyTorch ref same dtype | within budget |\n|---|---|---|---|---|---|")
    for r in accuracy:
        torch_err = "-" if r["torch"] is None else f"{r['torch']:.2e}"
        print(f"| {r['case']} | {r['dtype']} | {r['tensor']} | {r['triton']:.2e} | {torch_err} | {'yes' if r['ok'] else 'NO'} |")

    timings = []
    print("\n## SSD forward + backward\n\n| shape | dtype | backend | ms | peak GiB |\n|---|---|---|---|---|")
    for shape, dtype in TIMED:
        timings += time_ssd(shape, dtype, 256, device, repeats=3 if args.quick else 10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"accuracy": accuracy, "timings": timings}, f, indent=1)
    failed = [r for r in accuracy if not r["ok"]]
    print(f"\n{len(accuracy) - len(failed)} of {len(accuracy)} accuracy checks within budget")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

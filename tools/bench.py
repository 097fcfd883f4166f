"""Single-GPU training speed: megassm's trainer step against mamba-ssm, side by side.

megassm runs its real training step (megassm.train.Trainer.train_step: data loader, bf16 autocast,
the loss, the DDP engine's fused AdamW and clipping) in its default configuration; --variant adds
rows with config keys changed. The peers are mamba-ssm 2.3's MambaLMHeadModel with Mamba2 layers,
the same shapes and token batches, bf16 autocast, cross-entropy over its logits, fused AdamW,
clipping: "fused" is its default training path (use_mem_eff_path=True: conv, SSD and gated norm in
one autograd function, with causal-conv1d's CUDA conv; what mamba-ssm and Megatron-LM users train
with, and the reference for the ratios), "unfused" its path without causal-conv1d (nn.Conv1d).
Each measurement is its own process (a clean peak-memory figure, an out-of-memory that ends one
row only), all sharing one Triton cache, so the kernels autotune once per shape. Every process imports
megassm, so the peers run with its import-time setting too (expandable CUDA memory segments); what megassm's
trainer sets for itself (cuBLAS without a workspace) they do not. Neither loop reads
a loss or gradient norm on the host during the timed steps (they are read afterwards); megassm's trainer reads each
step's gradient norm once the next step is queued, which keeps the GPU busy: on one H100 its 780m log lines gave the
tokens/s of this loop (run 29: 75,247-75,765 against 75,639).

    python tools/bench.py                               # 130m 8x2048, 780m 8x2048, 1.3b 4x4096: megassm and both peers
    python tools/bench.py --cases 130m:8x2048 --variant eager:kernels.compile=false --profile
    python tools/bench.py --check                       # the fast path against the reference path, a few steps

MFU = tokens/s x (6 x parameters + 3 x SSD forward FLOPs per token) / the GPU's bf16 peak,
the same FLOPs for all. Peak memory over the whole run: torch.cuda.max_memory_allocated (tensors; a CUDA graph's
pool counts only while it captures) and max_memory_reserved (what the GPU gives the process: the graphs' pools and the
allocator's cached blocks too; where it nears the GPU's memory a step runs out). Each row also gives the
GPU's median SM clock and mean power over its timed steps (NVML, read every 10 ms from a thread; the power from the
board's energy counter: tools/gpu_clocks.py) and tokens per joule, since a GPU at its power limit lowers its
clock: there a step takes as long as its energy allows, and the ratio of energy per step to the fused peer's is the
ratio of speeds at equal power. "host ms": the time the last warm-up step took to return on the host, begun with the
GPU idle: its Python and launches, and any wait for the GPU inside it; "GPU waits": the calls in it that made the host
wait for the GPU, as torch.cuda's synchronization debug mode detects them (copies to the host, stream synchronizations).
Where host ms nears the step's own time with no such wait, the host likely sets the pace (or the step launches more
than the GPU's launch queue holds); a steady step's only after enough warm-up (the default 3: the peer's second step
is still slower than its steady ones). With --profile, also the ratio of GPU time per step to the fused peer's, which
counts where the peer's GPU waits on its host (at the clocks each ran).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.gpu_clocks import Sampler, cuda_reader  # noqa: E402

if TYPE_CHECKING:  # megassm (and torch) are imported only where they are used
    from megassm.config import Config

DEFAULT_CASES = ["130m:8x2048", "780m:8x2048", "1.3b:4x4096"]
RESULT_TAG = "BENCH_RESULT "
# Kernel families of the profile, first match wins (kernel names of torch 2.11, Triton 3.6, mamba-ssm 2.3).
FAMILIES = (
    ("conv1d (causal-conv1d CUDA)", r"causal_conv1d"),
    ("SSD scan (mamba-ssm Triton)", r"_chunk_cumsum|_chunk_state|_state_passing|_bmm_chunk|_chunk_scan"),
    ("SSD scan (megassm Triton)", r"^_(dt|states|segment_ends|carry|output|state_grads|head_grads|group_grads)_kernel$"),
    ("RMSNorms (mamba-ssm Triton)", r"_layer_norm|_rms_norm"),
    ("RMSNorms (megassm Triton)", r"^_gated_norm_backward_kernel$"),
    ("conv1d (megassm Triton)", r"^_conv_(forward|backward)_kernel$"),
    ("cross-entropy (megassm Triton)", r"^_loss_and_grad_kernel$"),
    ("partial-sum reductions (megassm Triton)", r"^_column_sums_kernel$"),
    ("matmuls (cuBLAS)", r"gemm|cutlass|xmma|sm90|sm80|cublas|Kernel2"),
    ("compiled elementwise (inductor)", r"^triton_"),
    ("optimizer (fused AdamW, clipping)", r"adam|multi_tensor|foreach"),
    ("conv1d (PyTorch depthwise, cuDNN)", r"conv|cudnn|winograd|implicit"),
    ("softmax / cross-entropy (eager)", r"softmax|cross_entropy|nll_loss|logsumexp"),
    ("copies, casts, concatenations", r"copy|Cat|cat_|fill|memcpy|memset"),
    ("other elementwise / reductions (eager)", r"elementwise|vectorized|reduce|unrolled|index|scatter|gather"),
)


def parse_case(case: str) -> tuple[str, int, int]:
    match = re.fullmatch(r"([\w.-]+):(\d+)x(\d+)", case)
    if not match:
        raise SystemExit(f"bench: case {case!r} is not SIZE:BATCHxSEQLEN, e.g. 130m:8x2048")
    return match[1], int(match[2]), int(match[3])


def megassm_config(case: str, data: str, steps: int, run_dir: str, overrides: list[str]) -> Config:
    from megassm.config import load_config
    from megassm.model import PRESETS

    size, batch, seq_len = parse_case(case)
    base = [f"--model.preset={size if size in PRESETS else 'mamba2-' + size}", f"--data.path={data}", f"--data.seq_len={seq_len}",
            f"--data.micro_batch={batch}", f"--data.global_batch={batch}", f"--train.steps={steps}", "--optim.warmup_steps=2",
            "--train.eval_every=0", f"--train.log_every={steps}", "--checkpoint.every=0", "--data.verify=false", f"--run.dir={run_dir}"]
    return load_config(None, base + [f"--{o}" for o in overrides], world_size=1)


def kernel_profile(step: Callable[[], object], steps: int, top: int) -> tuple[dict[str, float], list]:
    """GPU time per step (ms) of each kernel family over `steps` calls of step(), and the `top` kernels
    that took the most time: [name, family, ms per step]."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels: dict[str, list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        family = next((name for name, pattern in FAMILIES if re.search(pattern, event.name, re.IGNORECASE)), "other")
        ms = event.device_time_total / 1e3 / steps
        totals[family] = totals.get(family, 0.0) + ms
        kernels.setdefault(event.name, [event.name[:90], family, 0.0])[2] += ms
    return totals, sorted(kernels.values(), key=lambda k: -k[2])[:top]


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict[str, float]:
    """The run's peak memory, allocated and reserved, GiB."""
    import torch

    if not torch.cuda.is_available():
        return {"peak_gib": 0.0, "reserved_gib": 0.0}
    return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "reserved_gib": torch.cuda.max_memory_reserved() / 2**30}


def timed_steps(step: Callable[[int], object], warmup: int, steps: int, started: float) -> tuple[float, float, list, dict]:
    """(seconds from `started` (the worker's start) to the end of the first step, seconds per steady
    step, every step's result, what the steady steps measured: the GPU's SM clock and mean power (Sampler.summary: empty
    without NVML), and from the last warm-up step, begun with the GPU idle, the host's time to queue a step
    (queued_from_idle; with two warm-up steps or more: the first compiles and captures)."""
    results, first = [], None

    def run(i: int) -> None:
        nonlocal first
        results.append(step(i))
        if first is None:
            synchronize()
            first = time.perf_counter() - started

    for i in range(warmup - 1):
        run(i)
    queued = {}
    if warmup >= 2:
        queued = queued_from_idle(lambda: run(warmup - 1))
    elif warmup == 1:
        run(0)
    synchronize()
    with Sampler(cuda_reader()) as clocks:
        steady = time.perf_counter()
        for i in range(warmup, warmup + steps):
            run(i)
        synchronize()
        seconds = (time.perf_counter() - steady) / steps
    return first, seconds, results, {**clocks.summary(), **queued}


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda's synchronization debug mode, "warn"


def queued_from_idle(step: Callable[[], object]) -> dict:
    """host_s: the seconds step() takes to return with the GPU idle when it starts: the host's Python and launches, and
    any wait inside the step for the GPU (a synchronizing call; a launch queue filled while a graph or long kernel
    runs). syncs (CUDA only): the calls in it that made the host wait for the GPU as torch.cuda's synchronization debug
    mode detects them: copies to the host and stream synchronizations, not every kind (device synchronizations and
    event waits go unseen). Other warnings go where they would without it. Where host_s nears a steady step's time with
    no such call, the host likely sets the pace: a step of more launches than the queue holds cannot tell the two apart."""
    import torch

    cuda = torch.cuda.is_available()
    mode = torch.cuda.get_sync_debug_mode() if cuda else None
    syncs = 0
    synchronize()
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=SYNC_WARNING)  # each one, also a line's repeated
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
        show = warnings.showwarning

        def count_syncs(message, category, filename, lineno, file=None, line=None):
            nonlocal syncs
            if SYNC_WARNING in str(message):
                syncs += 1
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = count_syncs
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            queued = time.perf_counter()
            step()
            host_s = time.perf_counter() - queued
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(mode)
    synchronize()
    return {"host_s": host_s, **({"syncs": syncs} if cuda else {})}


def run_megassm(args: argparse.Namespace, started: float) -> dict:
    from megassm.metrics import StepTimer
    from megassm.train import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        total = args.warmup + args.steps + args.profile_steps
        cfg = megassm_config(args.case, args.data, total, run_dir, args.set)
        trainer = Trainer(cfg)
        timer = StepTimer(trainer.device)

        def step(i: int) -> tuple:  # (loss, gradient norm), read after the timing: no step waits for the GPU
            queued = trainer.train_step(i, timer)
            trainer.state["samples"] += cfg.data.global_batch
            return queued.loss_sum / queued.targets, queued.grad_norm

        first, seconds, results, clocks = timed_steps(step, args.warmup, args.steps, started)
        profile, top = kernel_profile(lambda: step(0), args.profile_steps, args.top) if args.profile_steps else ({}, [])
        val_loss = trainer.validation_losses()["val_loss"] if trainer.val_data else None  # train.eval_every > 0
        return {"first_step_s": first, "step_s": seconds, "top_kernels": top, "val_loss": val_loss,
                "losses": [r[0].item() for r in results], "grad_norms": [r[1].item() for r in results], "profile": profile,
                "flops_per_token": trainer.flops_per_token, "peak_flops": trainer.peak, "tokens": cfg.data.global_batch * cfg.data.seq_len,
                **peak_memory(), **clocks}


def import_peer() -> tuple[type, type]:
    """mamba-ssm's MambaLMHeadModel where mamba-ssm was installed without its CUDA extensions: the
    package is loaded bare (megassm.ops.mamba_triton) and Mamba-1's `selective_scan_cuda`, imported
    at module level but unused by Mamba2 layers, is an empty stand-in."""
    from megassm.ops import autotune_cache
    from megassm.ops.mamba_triton import load_triton_kernels

    load_triton_kernels()
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    autotune_cache.restore()  # the peer's own kernels (its fused add + RMSNorm) too
    return MambaConfig, MambaLMHeadModel


PEERS = {"peer-fused": "mamba-ssm fused (reference)", "peer-unfused": "mamba-ssm unfused"}


def run_peer(args: argparse.Namespace, started: float) -> dict:
    import torch
    import torch.nn.functional as F

    from megassm.data import SampleLoader, TokenStream, rank_samples
    from megassm.metrics import logical_param_count, model_flops_per_token, peak_flops
    from parallel import IGNORE_INDEX

    MambaConfig, MambaLMHeadModel = import_peer()
    fused = args.worker == "peer-fused"
    if fused:
        from mamba_ssm.ops.triton import ssd_combined

        if ssd_combined.causal_conv1d_fwd_function is None:
            raise SystemExit("the fused peer needs causal-conv1d's CUDA extension: pip install causal-conv1d")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = megassm_config(args.case, args.data, 1, run_dir, args.set)
    m, device = cfg.model, torch.device("cuda")
    ssm_cfg = dict(layer="Mamba2", d_state=m.d_state, d_conv=m.d_conv, expand=m.expand, headdim=m.headdim, ngroups=m.ngroups,
                   chunk_size=m.chunk_size, use_mem_eff_path=fused)
    config = MambaConfig(d_model=m.d_model, d_intermediate=0, n_layer=m.n_layer, vocab_size=m.vocab_size, ssm_cfg=ssm_cfg,
                         rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=1, tie_embeddings=True)
    torch.manual_seed(cfg.run.seed)
    model = MambaLMHeadModel(config, device=device, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=True)
    loader = SampleLoader(stream=TokenStream(next(iter(cfg.data.folders()))), split="train", seq_len=cfg.data.seq_len, seed=cfg.run.seed)
    batch_size = cfg.data.micro_batch

    def step(i: int) -> tuple:  # as megassm's
        batch = loader.batch(rank_samples(i * batch_size, 0, 0, 1, batch_size, batch_size), batch_size).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batch.input_ids).logits
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), batch.labels.view(-1), ignore_index=IGNORE_INDEX)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    first, seconds, results, clocks = timed_steps(step, args.warmup, args.steps, started)
    profile, top = kernel_profile(lambda: step(0), args.profile_steps, args.top) if args.profile_steps else ({}, [])
    return {"first_step_s": first, "step_s": seconds, "top_kernels": top, "losses": [r[0].item() for r in results],
            "grad_norms": [r[1].item() for r in results],
            "profile": profile, "flops_per_token": model_flops_per_token(m, cfg.data.seq_len, logical_param_count(m)),
            "peak_flops": peak_flops(device, cfg.train.peak_tflops), "tokens": batch_size * cfg.data.seq_len,
            **peak_memory(), **clocks}


def worker(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    import torch

    try:
        result = (run_peer if args.worker in PEERS else run_megassm)(args, started)
    except torch.OutOfMemoryError as error:
        result = {"oom": True, **peak_memory(), "error": str(error).splitlines()[0]}
    print(RESULT_TAG + json.dumps(result), flush=True)


def torchrun_env_for_one_process() -> dict[str, str]:
    """What this process's environment lacks of torchrun's for one process (DeepSpeed's engine needs it even then): a
    free port for the job's store where none is set."""
    env = {key: value for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                         "MASTER_ADDR": "127.0.0.1"}.items() if key not in os.environ}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(probe.getsockname()[1])
    return env


def spawn(args: argparse.Namespace, system: str, case: str, overrides: list[str]) -> dict:
    """One measurement in its own process; its last BENCH_RESULT line, or the reason there is none. A row of the
    DeepSpeed engine runs in torchrun's environment for one process."""
    command = [sys.executable, __file__, "--worker", system, "--case", case, "--data", args.data, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--profile", str(args.profile_steps), "--top", str(args.top)] + [f"--set={o}" for o in overrides]
    env = {**os.environ, **torchrun_env_for_one_process()} if "parallel.engine=deepspeed" in overrides else None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        return {"error": (done.stderr.strip().splitlines() or ["exit status %d" % done.returncode])[-1]}
    return json.loads(lines[-1][len(RESULT_TAG):])


def describe(result: dict) -> dict:
    """tokens/s, MFU, memory, the host's time per step and its waits for the GPU, and the GPU's SM clock, mean power and
    tokens per joule during the timed steps, of one result."""
    if "step_s" not in result:
        return {"tokens/s": "OOM" if result.get("oom") else "failed", "MFU": "-", **memory_columns(result),
                "first step s": "-", "host ms": "-", "GPU waits": "-", "SM MHz": "-", "W": "-", "tokens/J": "-"}
    tokens_per_s = result["tokens"] / result["step_s"]
    mfu = tokens_per_s * result["flops_per_token"] / result["peak_flops"] if result["peak_flops"] else None
    return {"tokens/s": f"{tokens_per_s:,.0f}", "MFU": f"{100 * mfu:.1f}%" if mfu else "-", **memory_columns(result),
            "first step s": f"{result['first_step_s']:.0f}", "host ms": f"{1e3 * result['host_s']:.0f}" if "host_s" in result else "-",
            "GPU waits": str(result.get("syncs", "-")), "SM MHz": f"{result['sm_mhz']:.0f}" if "sm_mhz" in result else "-",
            "W": f"{result['power_w']:.0f}" if "power_w" in result else "-",
            "tokens/J": f"{result['tokens'] / step_energy(result):.1f}" if "power_w" in result else "-"}


def memory_columns(result: dict) -> dict:
    reserved = result.get("reserved_gib")
    return {"peak GiB": f"{result.get('peak_gib', 0):.1f}", "reserved GiB": "-" if reserved is None else f"{reserved:.1f}"}


def ratio(reference: dict, result: dict, cost: Callable[[dict], float | None]) -> str:
    """How many times less `result` takes than `reference` by cost(result) (a step's wall or GPU time, or its energy),
    or "-"."""
    mine, theirs = cost(result), cost(reference)
    return f"{theirs / mine:.2f}x" if mine and theirs else "-"


def wall_time(result: dict) -> float | None:
    return result.get("step_s")


def gpu_time(result: dict) -> float | None:
    return sum(result["profile"].values()) if result.get("profile") else None


def step_energy(result: dict) -> float | None:
    """Joules per step: the mean power over the timed steps times their seconds per step."""
    return result["power_w"] * result["step_s"] if "power_w" in result and "step_s" in result else None


def require_prepared_data(path: str, tool: str) -> None:
    from megassm.data.shards import META_FILE

    if not (ROOT / path / META_FILE).exists():
        raise SystemExit(f"{tool}: no prepared data at {path}: run bash launch/quickstart.sh once, or tools/prepare_data.py")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows])


def compare(args: argparse.Namespace) -> None:
    variants = [("megassm", args.set)] + [(name, args.set + sets.split(",")) for name, sets in (v.split(":", 1) for v in args.variant)]
    peers = [(PEERS[f"peer-{p}"], f"peer-{p}", []) for p in args.peers]
    systems = peers + [(name, "megassm", sets) for name, sets in variants]  # the reference first: each row's ratio as it comes
    ratios = {"vs fused peer": wall_time, "energy vs fused peer": step_energy,
              **({"GPU time vs fused peer": gpu_time} if args.profile_steps else {})}
    rows, profiles = [], []
    for case in args.cases:
        reference = {}
        for label, system, sets in systems:
            result = spawn(args, system, case, sets)
            reference = result if system == "peer-fused" else reference
            rows.append([case, label, *describe(result).values(), *(ratio(reference, result, of) for of in ratios.values())])
            print(" | ".join(rows[-1]) + ("" if "error" not in result else f"  ({result['error']})"), flush=True)
            if result.get("profile"):
                profiles.append((f"{case} {label}", result["step_s"], result["profile"], result["top_kernels"]))
    print("\n" + markdown(["case", "system", *describe({}), *ratios], rows))
    for title, step_s, profile, top in profiles:
        total = sum(profile.values())
        print(f"\nGPU time per step by kernel family, {title} (step {1e3 * step_s:.1f} ms wall, kernels {total:.1f} ms):\n")
        ordered = sorted(profile.items(), key=lambda item: -item[1])
        print(markdown(["kernel family", "ms / step", "share"], [[name, f"{ms:.1f}", f"{100 * ms / total:.0f}%"] for name, ms in ordered]))
        if top:
            print(f"\nThe {len(top)} kernels taking the most time, {title}:\n")
            print(markdown(["kernel", "family", "ms / step"], [[f"`{name}`", family, f"{ms:.1f}"] for name, family, ms in top]))


def relative_difference(got: float, want: float) -> float:
    """|got - want| / |want|; inf where either is NaN or infinite (max() would drop a NaN)."""
    if got == want:
        return 0.0
    difference = abs(got - want) / abs(want) if want else math.inf
    return difference if math.isfinite(difference) else math.inf


def check(args: argparse.Namespace) -> None:
    """A few steps of the fast path (Triton SSD and norms, compiled elementwise, CUDA graphs) against
    the reference path (megassm's PyTorch SSD, conv and norms, eager) from the same weights and
    batches, two micro batches per step: the losses and gradient norms must agree to bf16 noise."""
    _, batch, _ = parse_case(args.check_case)
    # Two micro batches per step (gradient accumulation), and a validation loss after the steps (graphs replayed without gradients).
    common = [f"data.global_batch={2 * batch}", "train.eval_every=1000", f"train.eval_samples={2 * batch}", *args.set]
    fast = spawn(args, "megassm", args.check_case, [*common, "kernels.backend=triton", "train.cuda_graphs=true"])
    reference = spawn(args, "megassm", args.check_case,
                      [*common, "kernels.backend=torch", "kernels.compile=false", "train.cuda_graphs=false"])
    if "losses" not in fast or "losses" not in reference:
        raise SystemExit(f"bench --check: a run failed: fast {fast.get('error')}, reference {reference.get('error')}")
    rows, worst = [], 0.0
    for i, (lf, lr, gf, gr) in enumerate(zip(fast["losses"], reference["losses"], fast["grad_norms"], reference["grad_norms"])):
        worst = max(worst, relative_difference(lf, lr))
        rows.append([str(i + 1), f"{lr:.4f}", f"{lf:.4f}", f"{relative_difference(lf, lr):.1e}", f"{gr:.3f}", f"{gf:.3f}"])
    val_diff = relative_difference(fast["val_loss"], reference["val_loss"])
    worst = max(worst, val_diff)
    rows.append(["validation", f"{reference['val_loss']:.4f}", f"{fast['val_loss']:.4f}", f"{val_diff:.1e}", "", ""])
    print(markdown(["step", "loss reference", "loss fast", "rel. diff", "grad norm reference", "grad norm fast"], rows))
    verdict = "PASS" if worst < args.check_tolerance else "FAIL"
    print(f"\n{verdict}: largest relative loss difference {worst:.1e} (tolerance {args.check_tolerance:.0e}, bf16)")
    if verdict == "FAIL":
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="SIZE:BATCHxSEQLEN of a mamba2 preset")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="also run megassm with these config keys changed, e.g. chunk128:model.chunk_size=128")
    parser.add_argument("--peers", nargs="*", choices=["fused", "unfused"], default=["fused", "unfused"],
                        help="mamba-ssm's paths to run beside megassm (none: megassm only); ratios are to the fused one")
    parser.add_argument("--data", default="data/builtin", help="a prepared data folder (tools/prepare_data.py)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", dest="profile_steps", type=int, nargs="?", const=3, default=0,
                        help="also profile this many steps and print GPU time per kernel family")
    parser.add_argument("--top", type=int, default=0, help="with --profile: also list this many kernels taking the most time")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for each measurement")
    parser.add_argument("--check", action="store_true", help="compare the fast path with the reference path instead")
    parser.add_argument("--check-case", default="130m:2x2048")
    parser.add_argument("--check-tolerance", type=float, default=2e-2)
    parser.add_argument("--worker", choices=["megassm", *PEERS], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key for every megassm row")
    args = parser.parse_args()
    require_prepared_data(args.data, "bench")
    if args.worker:
        worker(args)
    elif args.check:
        check(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()

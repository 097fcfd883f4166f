"""Launch-parameter sweep of megassm's SSD Triton kernels (megassm/ops/ssd_triton*.py) on one GPU.

    python tools/tune_ssd_kernels.py [--budget-s 220] [--reps 20] [--workers N]

Shapes: 780m (b8 x 2048) and b1 x 32768, 48 heads, headdim 64, d_state 128, ngroups 1, bf16, 4 documents per row
(seq_idx), x, B, C, dt strided views of one in_proj-like tensor and the gradients written into views of one
buffer (tools/bench_ssd_kernels.py's helpers). The workload is the training one: ssd_forward, then
ssd_backward with the states the forward kept (as train.keep_ssd_states = "auto" does at both shapes on an H200).
Every kernel launch is bracketed by CUDA events (a
_sleep before each repetition keeps the CPU ahead of the GPU, so the events time the kernels, not the
launch gaps); medians of --reps repetitions after --warmup.

Variants are set by replacing an autotuner's `configs` with ONE triton.Config (its `cache` is then not
consulted: Triton's Autotuner.run takes configs[0] when there is one), by monkeypatching head_slice in
both modules, and by kernel_chunk. Compilation: the variants are first compiled in parallel worker
processes (Triton's warmup, nothing launched) into Triton's disk cache; the timing process then loads
them from there (--workers 0: compile in the timing process, serially).

--cpu-check: the logic on a tiny shape in Triton's interpreter on the CPU (timings meaningless).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=220.0, help="no new experiment (nor variant) after this many seconds")
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per variant (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: cores - 2, at most 14)")
    parser.add_argument("--cpu-check", action="store_true", help="tiny shapes in Triton's interpreter on the CPU")
    parser.add_argument("--max-variants", type=int, default=0, help="at most this many variants per experiment (0: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a compile worker's job file
    return parser.parse_args()


ARGS = parse_args()
if ARGS.cpu_check:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

from megassm.ops import ssd_triton_bwd as bwd  # noqa: E402
from megassm.ops import ssd_triton_fwd as fwd  # noqa: E402
from megassm.ops.ssd import NO_DT_LIMIT  # noqa: E402
from megassm.ops.ssd_triton import DEFAULT_KERNEL_CHUNK, ssd_backward, ssd_forward  # noqa: E402
from tools.bench_ssd import layer_shape  # noqa: E402
from tools.bench_ssd_kernels import ids_with_boundaries, mixer_tensors, relative_error  # noqa: E402

CUDA = not ARGS.cpu_check
CHUNK_SIZE = 256  # the model's (unused by the kernels)
DOCUMENTS = 4
LAYERS = 48  # 780m: per-step estimates
if CUDA:
    SHAPES = {"780m": layer_shape("mamba2-780m", 8, 2048), "32k": layer_shape("mamba2-780m", 1, 32768)}
else:
    SHAPES = {"tiny": dict(batch=1, seqlen=128, nheads=4, headdim=16, ngroups=1, dstate=16),
              "tiny-long": dict(batch=1, seqlen=256, nheads=4, headdim=16, ngroups=1, dstate=16)}
COMPILE_SHAPE = next(iter(SHAPES))  # the workers compile at this shape: the other one has the same specialization

# name -> (module, attribute): the module functions look these globals up at each call.
KERNELS = {"dt": (fwd, "_dt_kernel"), "states": (fwd, "_states_kernel"), "output": (fwd, "_output_kernel"),
           "state_grads": (bwd, "_state_grads_kernel"), "head_grads": (bwd, "_head_grads_kernel"),
           "group_grads": (bwd, "_group_grads_kernel")}
TUNED = ("states", "output", "state_grads", "head_grads", "group_grads")
REAL = {name: getattr(module, attr) for name, (module, attr) in KERNELS.items()}
ORIGINAL_HEAD_SLICE = fwd.head_slice
T0 = time.time()


def log(*a) -> None:
    print(*a, flush=True)


def elapsed() -> float:
    return time.time() - T0


# ---------------------------------------------------------------- configurations

def make_config(kwargs: dict, warps: int, stages: int, maxnreg: int | None = None) -> triton.Config:
    return triton.Config(dict(kwargs), num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def spec(config: triton.Config) -> list:
    return [dict(config.kwargs), config.num_warps, config.num_stages, config.maxnreg]


def label(config: triton.Config | None) -> str:
    if config is None:
        return "-"
    tiles = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in config.kwargs.items())
    registers = f" r{config.maxnreg}" if config.maxnreg else ""
    return f"{tiles + ' ' if tiles else ''}w{config.num_warps} s{config.num_stages}{registers}"


def same(a: triton.Config | None, b: triton.Config | None) -> bool:
    return a is not None and b is not None and spec(a) == spec(b)


ORIGINAL_CONFIGS = {name: list(REAL[name].configs) for name in TUNED}
STATE_TILES = [(16, 32), (16, 64), (32, 32), (32, 64), (64, 32), (64, 64), (16, 128), (32, 128), (64, 128)]
WARPS_STAGES = [(w, s) for w in (2, 4, 8) for s in (1, 2, 3, 4)]
HEAD_SLICES = (1, 2, 4, 8, 16, 24, 48)
KERNEL_CHUNK_VALUES = (32, 64, 128)


def blocked_sweep(block_ns: tuple[int, ...]) -> list[tuple]:
    """The chunk-parallel kernels (output, head and group grads) take d_state in blocks of BLOCK_N. ptxas gives them
    219-255 registers (2 programs of 4 warps per SM: tools/kernel_registers.py); a register cap (maxnreg) trades
    spills for occupancy: 8 warps at 128 registers is 2 programs of 8 warps per SM (the head gradients at BLOCK_N 64
    and 2 stages spill 24 bytes there, 504 at 4 warps and 168 registers: bench/raw/cpu_run37_kernel_registers_sm90.txt)."""
    return ([({"BLOCK_N": n}, w, s, None) for n in block_ns for w, s in ((4, 1), (4, 2), (4, 3), (8, 1), (8, 2))]
            + [({"BLOCK_N": n}, 4, s, r) for n in block_ns[:2] for s in (1, 2) for r in (128, 168)]
            + [({"BLOCK_N": n}, 8, s, 128) for n in block_ns[:2] for s in (1, 2, 3)])


# _group_grads_kernel at BLOCK_N 32 computes wrong dB, dC (and faults at 780m shapes) on an H200 with Triton 3.6.
BLOCK_NS = {"output": (32, 64, 128), "head_grads": (32, 64, 128), "group_grads": (64, 128)}


def unique(configs: list[triton.Config]) -> list[triton.Config]:
    out = []
    for c in configs:
        if not any(same(c, o) for o in out):
            out.append(c)
    return out


def sweep_configs(name: str) -> list[triton.Config]:
    """Round 1: the default list plus the sweep (states kernels: tiles at w4 s2; the others: BLOCK_N x warps x stages,
    and register caps)."""
    if name in ("states", "state_grads"):
        swept = [make_config({"BLOCK_P": p, "BLOCK_N": n}, 4, 2) for p, n in STATE_TILES]
    else:
        swept = [make_config(*variant) for variant in blocked_sweep(BLOCK_NS[name])]
    return unique(ORIGINAL_CONFIGS[name] + swept)


def limit(items: list) -> list:
    return items[:ARGS.max_variants] if ARGS.max_variants else items


# ---------------------------------------------------------------- launch control

def set_head_slice(value: int | None) -> None:
    """head_slice in both modules: `value` where it divides the group's heads, else the original."""
    if value is None:
        patched = ORIGINAL_HEAD_SLICE
    else:
        def patched(heads_per_group: int, chunk_programs: int) -> int:
            return value if heads_per_group % value == 0 else ORIGINAL_HEAD_SLICE(heads_per_group, chunk_programs)
    fwd.head_slice = patched
    bwd.head_slice = patched


def pin(pins: dict[str, triton.Config | None], head_slice: int | None = None) -> None:
    """Each tuned kernel: its one pinned config, or its original list (autotuned; its cache is left alone)."""
    for name in TUNED:
        REAL[name].configs = [pins[name]] if pins.get(name) is not None else ORIGINAL_CONFIGS[name]
    set_head_slice(head_slice)


class Recorder:
    active = False
    events: list = []
    chosen: dict = {}


def mark() -> torch.cuda.Event | float:
    if CUDA:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def span_ms(a: torch.cuda.Event | float, b: torch.cuda.Event | float) -> float:
    return a.elapsed_time(b) if CUDA else (b - a) * 1e3


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


class Timed:
    """Stands in for a kernel (module global): launches it as the module would, between two events."""

    def __init__(self, name: str, target) -> None:
        self.name, self.target = name, target

    def __getitem__(self, grid):
        launch = self.target[grid]

        def call(*args, **kwargs) -> object:
            start = mark() if Recorder.active else None
            result = launch(*args, **kwargs)
            if start is not None:
                Recorder.events.append((self.name, start, mark()))
            if getattr(self.target, "best_config", None) is not None:
                Recorder.chosen[self.name] = self.target.best_config
            return result
        return call


class WarmupOnly:
    """Compiles the kernel (one config) as the module would launch it, launching nothing (compile workers)."""

    def __init__(self, target, config: triton.Config | None) -> None:
        self.fn = target.fn if config is not None else target
        self.options = config.all_kwargs() if config is not None else {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.fn.run(*args, grid=grid, warmup=True, **kwargs, **self.options)


class NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


# ---------------------------------------------------------------- the workload

class Case:
    def __init__(self, name: str, device: torch.device) -> None:
        shape = SHAPES[name]
        self.name, self.shape = name, shape
        wide, views, params = mixer_tensors(**shape, dtype=torch.bfloat16, device=device)
        self.x, self.B, self.C, self.dt = views(wide)
        self.A, self.D, self.dt_bias = params["A"], params["D"], params["dt_bias"]
        seqlen = shape["seqlen"]
        self.seq_idx = ids_with_boundaries(shape["batch"], seqlen, [seqlen * k // DOCUMENTS + 17 * k for k in range(1, DOCUMENTS)], device)
        self.dy = torch.randn_like(self.x)
        self.grad = torch.zeros_like(wide)
        self.dx, self.dB, self.dC, self.ddt = views(self.grad)
        self.common = dict(D=self.D, dt_bias=self.dt_bias, seq_idx=self.seq_idx, dt_softplus=True)

    def __str__(self) -> str:
        s = self.shape
        return f"{self.name} (b{s['batch']} x {s['seqlen']}, h{s['nheads']} p{s['headdim']} n{s['dstate']} g{s['ngroups']})"

    def default_head_slice(self, chunk: int = DEFAULT_KERNEL_CHUNK) -> int:
        s = self.shape
        return ORIGINAL_HEAD_SLICE(s["nheads"] // s["ngroups"], s["batch"] * math.ceil(s["seqlen"] / chunk) * s["ngroups"])

    def run(self, chunk: int = DEFAULT_KERNEL_CHUNK) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        y, _, saved = ssd_forward(self.x, self.dt, self.A, self.B, self.C, CHUNK_SIZE, kernel_chunk=chunk, **self.common)
        grads = ssd_backward(self.dy, self.x, self.dt, self.A, self.B, self.C, CHUNK_SIZE, **self.common, saved=saved,
                             dx=self.dx, ddt=self.ddt, dB=self.dB, dC=self.dC, kernel_chunk=chunk)
        return y, grads

    def results(self, chunk: int = DEFAULT_KERNEL_CHUNK) -> dict[str, torch.Tensor]:
        y, grads = self.run(chunk)
        _, _, dA, _, _, dD, ddt_bias, _ = grads
        sync()
        return dict(y=y.clone(), dx=self.dx.clone(), ddt=self.ddt.clone(), dB=self.dB.clone(), dC=self.dC.clone(), dA=dA.clone(),
                    dD=dD.clone(), ddt_bias=ddt_bias.clone())


def sleep_cycles_per_ms() -> float:
    if not CUDA:
        return 0.0
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    torch.cuda.synchronize()
    return 20_000_000 / max(start.elapsed_time(end), 1e-3)


CYCLES_PER_MS = 1.0


def measure(case: Case, chunk: int = DEFAULT_KERNEL_CHUNK) -> dict[str, float]:
    """Median ms of each kernel per launch, of the whole fwd + bwd ('total'), and the configs each kernel ran ('chosen')."""
    Recorder.active = False
    cpu = []
    for i in range(ARGS.warmup):  # the first compiles (or loads) and, for a list of configs, autotunes
        t = time.perf_counter()
        case.run(chunk)
        if i:
            cpu.append((time.perf_counter() - t) * 1e3)
        sync()
    cpu_ms = statistics.median(cpu) if cpu else 5.0
    sleep_ms = min(50.0, max(1.0, 3 * cpu_ms + 0.5))  # the GPU waits while the CPU queues the whole repetition
    per_kernel: dict[str, list[float]] = {}
    totals = []
    for _ in range(ARGS.reps):
        Recorder.events = []
        if CUDA:
            torch.cuda._sleep(int(sleep_ms * CYCLES_PER_MS))
        Recorder.active = True
        start = mark()
        case.run(chunk)
        end = mark()
        Recorder.active = False
        sync()
        totals.append(span_ms(start, end))
        for name, a, b in Recorder.events:
            per_kernel.setdefault(name, []).append(span_ms(a, b))
    out = {name: statistics.median(v) for name, v in per_kernel.items()}
    out["total"] = statistics.median(totals)
    return out


# ---------------------------------------------------------------- compile workers

def worker_main(job_file: str) -> int:
    """Compile each job's kernel (one config, head slice, kernel chunk) as the timing process will launch it, at
    COMPILE_SHAPE, into Triton's disk cache; launch nothing. One JSON line per job."""
    jobs = json.loads(Path(job_file).read_text())
    device = torch.device("cuda" if CUDA else "cpu")  # the CPU: a check of the dispatch (the interpreter's warmup does nothing)
    case = Case(COMPILE_SHAPE, device)
    batch, length, heads, headdim = case.x.shape
    dstate = case.B.shape[3]
    f32 = dict(dtype=torch.float32, device=device)
    for index, job in enumerate(jobs):
        t = time.time()
        try:
            chunk = job["Q"]
            nchunks = triton.cdiv(length, chunk)
            for name, (module, attr) in KERNELS.items():
                setattr(module, attr, NoLaunch())
            name = job["kernel"]
            config = None if job["config"] is None else make_config(*job["config"])
            module, attr = KERNELS[name]
            setattr(module, attr, WarmupOnly(REAL[name], config))
            set_head_slice(job["hps"])
            dt_p = torch.empty(batch, heads, length, **f32)
            cs = torch.empty(batch, heads, length, **f32)
            states = torch.empty(batch, nchunks, heads, headdim, dstate, dtype=case.x.dtype, device=device)
            if name == "dt":
                fwd.discretize(case.dt, case.A, case.dt_bias, True, NO_DT_LIMIT, chunk)
            elif name == "states":
                fwd.chunk_states(case.x, case.B, dt_p, cs, case.seq_idx, None, chunk)
            elif name == "output":
                fwd.chunk_outputs(case.x, case.B, case.C, dt_p, cs, case.seq_idx, states, case.D, chunk)
            elif name == "state_grads":
                bwd.state_grads(case.dy, case.C, cs, case.seq_idx, None, heads, chunk)
            else:
                bwd.chunk_grads(case.dy, case.x, case.dt, case.A, case.B, case.C, dt_p, cs, torch.empty_like(cs), states,
                                torch.empty_like(states), case.D, case.dt_bias, case.seq_idx, chunk, case.dx, case.ddt, case.dB, case.dC)
            print(json.dumps(dict(job=index, ok=True, s=round(time.time() - t, 2))), flush=True)
        except Exception as error:  # noqa: BLE001
            print(json.dumps(dict(job=index, ok=False, s=round(time.time() - t, 2), err=f"{type(error).__name__}: {error}"[:300])),
                  flush=True)
    return 0


class Precompile:
    """Jobs dealt round-robin to worker processes (started here, waited for or ended by their ids)."""

    def __init__(self, jobs: list[dict], workers: int, what: str) -> None:
        self.jobs, self.what, self.procs, self.t = jobs, what, [], time.time()
        if workers <= 0 or not jobs or not CUDA:
            return
        self.folder = tempfile.mkdtemp(prefix="tune_ssd_")
        for w in range(min(workers, len(jobs))):
            job_file = Path(self.folder, f"jobs{w}.json")
            job_file.write_text(json.dumps(jobs[w::workers]))
            out = open(Path(self.folder, f"out{w}.txt"), "w")  # noqa: SIM115
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file)], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=str(ROOT))
            self.procs.append((proc, out, job_file))

    def wait(self, timeout_s: float) -> None:
        if not self.procs:
            return
        deadline = time.time() + max(timeout_s, 1.0)
        for proc, _, _ in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()  # only the workers this script started, by their handle
                proc.wait()
        ok, failed = 0, []
        for proc, out, job_file in self.procs:
            out.close()
            for line in Path(out.name).read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if r.get("ok"):
                    ok += 1
                else:
                    failed.append(r.get("err", "?"))
        log(f"[precompile {self.what}] {ok}/{len(self.jobs)} kernels compiled in {time.time() - self.t:.1f} s by {len(self.procs)} "
            f"workers; {len(failed)} failed{': ' + failed[0] if failed else ''}")
        if ok == 0:
            tail = Path(self.procs[0][1].name).read_text()[-1500:]
            log(f"  (worker 0 output tail: {tail!r}) - the timing process compiles what is missing")
        self.procs = []


def job(kernel: str, config: triton.Config | None, chunk: int = DEFAULT_KERNEL_CHUNK, hps: int | None = None) -> dict:
    return dict(kernel=kernel, config=None if config is None else spec(config), Q=chunk, hps=hps)


def round1_jobs() -> list[dict]:
    jobs = [job("dt", None)]
    for name in TUNED:  # the original lists first: the baseline needs them
        jobs += [job(name, c) for c in ORIGINAL_CONFIGS[name]]
    for name in ("head_grads", "group_grads", "states", "output", "state_grads"):
        jobs += [job(name, c) for c in limit(sweep_configs(name)) if not any(same(c, o) for o in ORIGINAL_CONFIGS[name])]
    for name in ("output", "group_grads"):  # head slice 1 and a multiple of 16 are their own specializations
        jobs += [job(name, c, hps=h) for c in ORIGINAL_CONFIGS[name] for h in (1, 16)]
    for chunk in KERNEL_CHUNK_VALUES:
        if chunk != DEFAULT_KERNEL_CHUNK:
            jobs += [job("dt", None, chunk)] + [job(name, c, chunk) for name in TUNED for c in ORIGINAL_CONFIGS[name]]
    return jobs


# ---------------------------------------------------------------- experiments

RESULTS: dict = {}  # (kernel, shape) -> list of (config, ms); kernel "head_slice" / "kernel_chunk": (value, ms)
DEFAULTS: dict = {}  # shape -> {kernel: config chosen by the current autotuning}
BASE: dict = {}  # shape -> measure() of the defaults


def over_budget() -> bool:
    return elapsed() > ARGS.budget_s


def fmt(ms: float | None) -> str:
    return "      -" if ms is None or ms != ms else f"{ms:7.3f}"


def table(title: str, rows: list, cases: list[Case], baseline: dict | None = None) -> None:
    """rows: [variant, {shape: ms}, {shapes where it is the default}]; sorted by the first shape's time."""
    log(f"  -- {title}: ms, sorted by {cases[0].name}; x = speedup vs the current default (*)")
    first = cases[0].name
    defaults = {c.name: next((r[1].get(c.name) for r in rows if c.name in r[2] and c.name in r[1]), (baseline or {}).get(c.name))
                for c in cases}
    head = "".join(f" {c.name:>9}  {'x':>5}" for c in cases)
    log(f"     {'variant':<20}{head}")
    for variant, ms, default_in in sorted(rows, key=lambda r: (r[1].get(first, math.inf), min(r[1].values(), default=math.inf))):
        cells = ""
        for c in cases:
            v, d = ms.get(c.name), defaults[c.name]
            speed = f"{d / v:5.2f}" if v and d else "    -"
            cells += f" {fmt(v):>9}{'*' if c.name in default_in else ' '} {speed}"
        log(f"     {variant:<20}{cells}")


def kernel_sweep(name: str, cases: list[Case], configs_by_case: dict[str, list[triton.Config]], title: str) -> None:
    """Time `name` under each config (one at a time; the other kernels at their defaults), at each case."""
    log(f"\n== {title} [{elapsed():.0f} s]")
    rows: dict[str, tuple[str, dict, bool]] = {}
    variants = unique([c for case in cases for c in configs_by_case.get(case.name, [])])
    for config in variants:
        if over_budget():
            log("  budget reached: the rest of this sweep skipped")
            break
        line = f"  {label(config):<20}"
        row = rows.setdefault(label(config), [label(config), {}, set()])
        for case in cases:
            if not any(same(config, c) for c in configs_by_case.get(case.name, [])):
                continue
            try:
                pin({**DEFAULTS[case.name], name: config})
                ms = measure(case)[name]
                RESULTS.setdefault((name, case.name), []).append((config, ms))
                row[1][case.name] = ms
                is_default = same(config, DEFAULTS[case.name][name])
                if is_default:
                    row[2].add(case.name)
                line += f" {case.name} {ms:.3f}{'*' if is_default else ''}"
            except Exception as error:  # noqa: BLE001
                line += f" {case.name} FAILED {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        log(line)
    if rows:
        table(title, list(rows.values()), cases, {case.name: default_ms(name, case) for case in cases})


def best(name: str, case: Case) -> tuple[object, float] | None:
    found = [r for r in RESULTS.get((name, case.name), []) if r[1] == r[1]]
    return min(found, key=lambda r: r[1]) if found else None


def default_ms(name: str, case: Case) -> float | None:
    for config, ms in RESULTS.get((name, case.name), []):
        if name in TUNED and same(config, DEFAULTS[case.name][name]):
            return ms
    return BASE.get(case.name, {}).get(name)


def head_slice_sweep(cases: list[Case]) -> None:
    log(f"\n== heads per program (head_slice in both modules): output and group grads kernels, and the whole fwd+bwd [{elapsed():.0f} s]")
    rows = {}
    for value in sorted({*HEAD_SLICES, *(c.default_head_slice() for c in cases)}):
        if over_budget():
            log("  budget reached: the rest of this sweep skipped")
            break
        line = f"  {value:>3} heads/program"
        for case in cases:
            heads_per_group = case.shape["nheads"] // case.shape["ngroups"]
            if heads_per_group % value:
                continue
            try:
                pin(DEFAULTS[case.name], value)
                m = measure(case)
                RESULTS.setdefault(("head_slice", case.name), []).append((value, m["total"]))
                is_default = value == case.default_head_slice()
                for kernel in ("output", "group_grads", "total"):
                    row = rows.setdefault((kernel, value), [f"{value} heads/program", {}, set()])
                    row[1][case.name] = m[kernel]
                    if is_default:
                        row[2].add(case.name)
                mark = "*" if is_default else ""
                line += f" | {case.name}: output {m['output']:.3f} group {m['group_grads']:.3f} fwd+bwd {m['total']:.3f}{mark}"
            except Exception as error:  # noqa: BLE001
                line += f" | {case.name} FAILED {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        if "|" in line:
            log(line)
    set_head_slice(None)
    for what in ("output", "group_grads", "total"):
        selected = [v for k, v in rows.items() if k[0] == what]
        if selected:
            table(f"head slice: {what}{' (ms of one fwd+bwd, with the dB/dC partial sums)' if what == 'total' else ''}", selected, cases)


def kernel_chunk_sweep(cases: list[Case]) -> None:
    log(f"\n== kernel_chunk (whole fwd + bwd; each kernel's original config list, autotuned at that chunk) [{elapsed():.0f} s]")
    rows = []
    for chunk in KERNEL_CHUNK_VALUES:
        if over_budget():
            log("  budget reached: the rest of this sweep skipped")
            break
        line, row = f"  Q={chunk:<4}", [f"kernel_chunk {chunk}", {}, {c.name for c in cases} if chunk == DEFAULT_KERNEL_CHUNK else set()]
        for case in cases:
            try:
                pin({})  # the original lists: autotuned at this chunk as a switch of kernel_chunk would be
                Recorder.chosen = {}
                m = measure(case, chunk)
                RESULTS.setdefault(("kernel_chunk", case.name), []).append((chunk, m["total"]))
                row[1][case.name] = m["total"]
                parts = " ".join(f"{k} {m[k]:.3f}" for k in ("states", "output", "state_grads", "head_grads", "group_grads") if k in m)
                chosen = ", ".join(f"{k} {label(v)}" for k, v in Recorder.chosen.items())
                line += f" | {case.name}: fwd+bwd {m['total']:.3f} ({parts}; chose {chosen})"
            except Exception as error:  # noqa: BLE001
                line += f" | {case.name} FAILED {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
        log(line)
        rows.append(row)
    if rows:
        table("kernel_chunk: ms of one fwd+bwd", rows, cases)


def summary(cases: list[Case]) -> None:
    log(f"\n==================== SUMMARY [{elapsed():.0f} s]")
    log("best config per kernel at each shape vs the current default (ms per launch; x = speedup)")
    combos = {}
    for case in cases:
        log(f"  {case}")
        pins, step_default, step_best = {}, 0.0, 0.0
        for name in TUNED:
            d, b = default_ms(name, case), best(name, case)
            default_config = DEFAULTS[case.name][name]
            if b is None or d is None or b[1] >= d:
                pins[name] = default_config
                log(f"    {name:<12} default {label(default_config):<16} {fmt(d)} | best: the default (or not measured)")
                b_ms = d
            else:
                pins[name] = b[0]
                log(f"    {name:<12} default {label(default_config):<16} {fmt(d)} | best {label(b[0]):<16} {fmt(b[1])}  x{d / b[1]:.2f}")
                b_ms = b[1]
            if d is not None:
                step_default += d
                step_best += b_ms if b_ms is not None else d
        hps_rows = RESULTS.get(("head_slice", case.name), [])
        hps_default = case.default_head_slice()
        hps_best = min(hps_rows, key=lambda r: r[1])[0] if hps_rows else hps_default
        d_total = next((ms for v, ms in hps_rows if v == hps_default), None)
        b_total = next((ms for v, ms in hps_rows if v == hps_best), None)
        log(f"    head_slice   default {hps_default:<16} {fmt(d_total)} | best {hps_best:<16} {fmt(b_total)} (ms of one fwd+bwd)")
        q_rows = RESULTS.get(("kernel_chunk", case.name), [])
        if q_rows:
            q_best = min(q_rows, key=lambda r: r[1])
            q_default = next((ms for v, ms in q_rows if v == DEFAULT_KERNEL_CHUNK), None)
            log(f"    kernel_chunk default {DEFAULT_KERNEL_CHUNK:<16} {fmt(q_default)} | best {q_best[0]:<16} {fmt(q_best[1])} "
                "(ms of one fwd+bwd, autotuned lists)")
        factor = LAYERS if case.name == "780m" else 1
        log(f"    sum of the five kernels per fwd+bwd (each launched once): default {step_default:.3f} ms, best configs {step_best:.3f} ms"
            + (f"; x{LAYERS} layers: {step_default * factor:.1f} -> {step_best * factor:.1f} ms per step" if factor > 1 else ""))
        combos[case.name] = (pins, hps_best)
    # Kernels whose autotuning key has no shape: one config serves both shapes.
    log("  output/head_grads/group_grads autotune on (P, N, Q) only: one config serves every shape. Best over all shapes"
        " (geometric mean of time vs default):")
    for name in ("output", "head_grads", "group_grads", "states", "state_grads"):
        scores = {}
        for case in cases:
            d = default_ms(name, case)
            for config, ms in RESULTS.get((name, case.name), []):
                if d and ms == ms:
                    scores.setdefault(label(config), []).append(math.log(ms / d))
        full = {k: v for k, v in scores.items() if len(v) == len(cases)}
        if full:
            k = min(full, key=lambda key: sum(full[key]))
            log(f"    {name:<12} {k:<16} geo-mean x{math.exp(-sum(full[k]) / len(full[k])):.3f} vs default")

    log("\nwhole fwd+bwd (ssd_forward, ssd_backward with the kept states), current defaults vs all best choices combined (kernel_chunk 64)")
    for case in cases:
        pins, hps = combos[case.name]
        try:
            pin(DEFAULTS[case.name])
            want = case.results()
            m_default = measure(case)
            pin(pins, hps)
            got = case.results()
            m_best = measure(case)
            speedup = m_default["total"] / m_best["total"]
            log(f"  {case.name}: default {m_default['total']:.3f} ms -> combined {m_best['total']:.3f} ms  x{speedup:.3f}"
                f"   (head_slice {hps}; {', '.join(f'{k} {label(v)}' for k, v in pins.items())})")
            log("    per kernel: " + ", ".join(f"{k} {m_default.get(k, math.nan):.3f}->{m_best.get(k, math.nan):.3f}" for k in
                                            ("dt", *TUNED)))
            errors = {k: relative_error(got[k], want[k]) for k in want}
            worst = max(errors, key=errors.get)
            log(f"    accuracy (max|best - default| / max|default|): worst {worst} {errors[worst]:.2e}; "
                + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        except Exception as error:  # noqa: BLE001
            log(f"  {case.name}: combined run FAILED {type(error).__name__}: {error}")
            traceback.print_exc()
    pin(DEFAULTS[cases[0].name])
    set_head_slice(None)


def main() -> int:
    global CYCLES_PER_MS
    if ARGS.worker:
        return worker_main(ARGS.worker)
    if CUDA and not torch.cuda.is_available():
        log("needs a CUDA GPU (or --cpu-check)")
        return 2
    if ARGS.cpu_check:
        from tests.triton_interpreter import interpret_ssd_kernels
        interpret_ssd_kernels()  # the interpreter's loop-bound fix; keeps each kernel's first config (no autotuning on a CPU)
        for name in TUNED:
            ORIGINAL_CONFIGS[name] = list(REAL[name].configs)
        ARGS.reps, ARGS.warmup = min(ARGS.reps, 2), min(ARGS.warmup, 1)
        ARGS.workers = 0
    device = torch.device("cuda" if CUDA else "cpu")
    workers = ARGS.workers if ARGS.workers is not None else max(1, min(14, (os.cpu_count() or 4) - 2))
    log(f"tune_ssd: {torch.cuda.get_device_name() if CUDA else 'CPU (interpreter)'}, torch {torch.__version__}, triton "
        f"{triton.__version__}, budget {ARGS.budget_s:.0f} s, {ARGS.reps} reps, {workers} compile workers")
    round1 = Precompile(round1_jobs(), workers, "round 1")
    cases = [Case(name, device) for name in SHAPES]
    CYCLES_PER_MS = sleep_cycles_per_ms()
    round1.wait(min(240.0, ARGS.budget_s * 0.6))

    # The defaults: the original lists with the choices megassm recorded on this machine (as training restores them), else autotuned here.
    restored = 0
    if CUDA:
        try:
            from megassm.ops import autotune_cache
            restored = autotune_cache.restore()  # read only: nothing is recorded at exit
        except Exception as error:  # noqa: BLE001
            log(f"  (autotune cache not restored: {type(error).__name__}: {error})")
    for name, (module, attr) in KERNELS.items():  # after restore(): it finds the autotuners as module globals
        setattr(module, attr, Timed(name, REAL[name]))
    log(f"\n== current defaults ({restored} recorded autotuning choices restored; the rest autotuned now) [{elapsed():.0f} s]")
    for case in cases:
        pin({})
        Recorder.chosen = {}
        BASE[case.name] = m = measure(case)
        DEFAULTS[case.name] = {name: Recorder.chosen.get(name, ORIGINAL_CONFIGS[name][0]) for name in TUNED}
        log(f"  {case}: fwd+bwd {m['total']:.3f} ms; head_slice {case.default_head_slice()}")
        for name in ("dt", *TUNED):
            log(f"    {name:<12} {m.get(name, math.nan):7.3f} ms  {label(DEFAULTS[case.name].get(name))}")

    experiments = [
        ("head_grads", "_head_grads_kernel: BLOCK_N x num_warps x num_stages (r: register cap)"),
        ("group_grads", "_group_grads_kernel: BLOCK_N x num_warps x num_stages (r: register cap)"),
        ("states", "_states_kernel: BLOCK_P x BLOCK_N at w4 s2 (and the original list)"),
        ("output", "_output_kernel: BLOCK_N x num_warps x num_stages (r: register cap)"),
        ("state_grads", "_state_grads_kernel: BLOCK_P x BLOCK_N at w4 s2 (and the original list)"),
    ]
    round2 = None
    for name, title in experiments:
        if over_budget():
            log(f"\nbudget reached ({elapsed():.0f} s): {name} sweep skipped")
            continue
        kernel_sweep(name, cases, {case.name: limit(sweep_configs(name)) for case in cases}, title)
        if name == "state_grads":  # round 2's compiles overlap with the head slice sweep
            round2_configs = round2_plan(cases)
            round2 = Precompile([job(k, c) for k, per_case in round2_configs.items() for c in unique(sum(per_case.values(), []))],
                                workers, "round 2")
    if not over_budget():
        head_slice_sweep(cases)
    else:
        log("\nbudget reached: head_slice sweep skipped")
    if round2 is not None:
        round2.wait(max(ARGS.budget_s - elapsed(), 5.0))
        for name, per_case in round2_configs.items():
            if over_budget():
                log(f"\nbudget reached: {name} warps x stages skipped")
                continue
            kernel_sweep(name, cases, per_case, f"{KERNELS[name][1]}: num_warps x num_stages at each shape's best tile of round 1")
    if not over_budget():
        kernel_chunk_sweep(cases)
    else:
        log("\nbudget reached: kernel_chunk sweep skipped")
    summary(cases)
    log(f"\ndone in {elapsed():.0f} s")
    return 0


def round2_plan(cases: list[Case]) -> dict[str, dict[str, list[triton.Config]]]:
    """states kernels: warps x stages at each shape's best tile of round 1."""
    plan = {}
    for name in ("states", "state_grads"):
        per_case = {}
        for case in cases:
            b = best(name, case)
            if b is None:
                continue
            tiles = b[0].kwargs
            per_case[case.name] = limit(unique([make_config(tiles, w, s) for w, s in WARPS_STAGES]))
        if per_case:
            plan[name] = per_case
    return plan


if __name__ == "__main__":
    sys.exit(main())

"""Several GPUs: TP, sequence parallelism and CP on NCCL against one GPU, the collectives per layer,
scaling, and a checkpoint resumed under another layout.

Every measurement runs megassm's own code under torchrun: the trainer (`python -m megassm.train`,
its metrics.jsonl read back) or, for the collectives, the model in a worker process. Without GPUs
the same runs use CPU processes and gloo, which is how this tool is tested (tests/test_bench_parallel.py).

    python tools/bench_parallel.py check         # tp2, tp2+SP, cp2, tp2xcp2 (and 4/8) vs one GPU: 20 steps of 130m, bf16
    python tools/bench_parallel.py collectives   # per layer: TP collectives each way; CP bytes at 8K, 32K, 128K tokens
    python tools/bench_parallel.py scaling       # 780m tokens/s per GPU for tp 1-8; CP weak scaling (32K tokens/GPU); longest sequence
    python tools/bench_parallel.py reshard       # written with one layout, resumed with another: the same losses
    python tools/bench_parallel.py profile --cp 2 --seq-len 32768   # one rank's forward + backward by op, on one GPU

Add --preset debug --seq-len 64 (and --gpus 4) to try it on CPU processes.

With --one-rank, scaling runs rank 0 of each layout alone on one device, every collective answered by
torch's fake process group: the compute time and memory of one GPU of a layout larger than the
machine, without communication (what a layout costs at best; the losses are not the job's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from bench import ROOT, markdown, require_prepared_data, synchronize  # tools/ is on the path when run as a script

# (name, tp, cp, sequence parallelism); a layout runs where tp * cp GPUs exist, with dp = 1.
LAYOUTS = [("tp2", 2, 1, False), ("tp2+sp", 2, 1, True), ("cp2", 1, 2, False), ("tp2xcp2", 2, 2, False), ("tp4", 4, 1, False),
           ("cp4", 1, 4, False), ("tp2xcp4", 2, 4, False), ("tp8", 8, 1, False), ("cp8", 1, 8, False)]


def torchrun(nproc: int, module_args: list[str], timeout: int) -> subprocess.CompletedProcess:
    # Port 0: the kernel picks the rendezvous port as torchrun binds it (as torchrun --standalone does), so that no
    # other process (a parallel test's) can take it between its choice and its use.
    return launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
                   "--rdzv-endpoint", "127.0.0.1:0", *module_args], timeout)


def launch(command: list[str], timeout: int) -> subprocess.CompletedProcess:
    # The caller's path stays: mamba-ssm may be installed outside site-packages (pip --target, bench/RESULTS.md).
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as expired:  # its output is bytes, whatever `text` says
        return subprocess.CompletedProcess(command, 124, (expired.stdout or b"").decode(errors="replace"), f"no result within {timeout} s")


def failure(done: subprocess.CompletedProcess) -> str:
    """The line that says why a torchrun job failed: its last error line from a rank (the trainer's
    message or a traceback's last line), not torchrun's closing banner."""
    if done.returncode == 124:
        return done.stderr  # the time limit, not whatever the ranks printed last
    lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if ("Error" in line or "error:" in line.lower()) and "ChildFailedError" not in line]
    from_ranks = [line for line in errors if line.startswith("[rank")]
    return (from_ranks or errors or lines or [f"exit status {done.returncode}"])[-1]


def train(args: argparse.Namespace, run_dir: Path, tp: int, cp: int, sp: bool = False, nproc: int | None = None,
          extra: tuple[str, ...] = ()) -> list[dict] | str:
    """The trainer's metrics.jsonl records of one run, or the last line of its error."""
    from megassm.metrics import read_metrics

    overrides = [f"--model.preset={args.preset}", f"--model.ngroups={args.ngroups}", f"--data.path={args.data}",
                 f"--data.seq_len={args.seq_len}", f"--data.micro_batch={args.micro_batch}", f"--data.global_batch={args.global_batch}",
                 f"--train.steps={args.steps}", "--train.log_every=1", "--train.eval_every=0", "--checkpoint.every=-1",
                 "--data.verify=false", "--optim.warmup_steps=5", f"--parallel.tp={tp}", f"--parallel.cp={cp}",
                 f"--parallel.sequence_parallel={str(sp).lower()}", f"--run.dir={run_dir}", *extra, *(f"--{kv}" for kv in args.set)]
    if torch.cuda.is_available():  # a GPU figure must come from the Triton kernels, never the silent fallback of "auto"
        overrides.insert(0, "--kernels.backend=triton")
    if args.one_rank:
        done = launch([sys.executable, __file__, "rank", "--gpus", str(nproc or tp * cp), *overrides], args.timeout)
    else:
        done = torchrun(nproc or tp * cp, ["-m", "megassm.train", *overrides], args.timeout)
    if done.returncode:
        return failure(done)
    return read_metrics(run_dir)


def largest_difference(got: list[dict], want: list[dict], key: str, steps: range) -> float:
    got_by, want_by = {r["step"]: r[key] for r in got if key in r}, {r["step"]: r[key] for r in want if key in r}
    return max(abs(got_by[s] - want_by[s]) / abs(want_by[s]) for s in steps)


def check(args: argparse.Namespace) -> bool:
    """Each layout against one GPU: the loss and gradient norm of every step."""
    with tempfile.TemporaryDirectory() as tmp:
        reference = train(args, Path(tmp, "one"), 1, 1)
        if isinstance(reference, str):
            raise SystemExit(f"bench_parallel: the one-GPU run failed: {reference}")
        rows, passed = [], True
        for name, tp, cp, sp in [layout for layout in LAYOUTS if layout[1] * layout[2] <= args.gpus and layout[0] in args.layouts]:
            got = train(args, Path(tmp, name), tp, cp, sp)
            if isinstance(got, str):
                rows.append([name, "failed", "-", got[:120]])
                passed = False
                continue
            loss, norm = (largest_difference(got, reference, key, range(1, args.steps + 1)) for key in ("loss", "grad_norm"))
            passed &= loss <= args.tolerance
            rows.append([name, f"{loss:.1e}", f"{norm:.1e}", "PASS" if loss <= args.tolerance else "FAIL"])
    print(markdown(["layout (dp = 1)", "largest loss difference", "largest grad norm difference", f"loss within {args.tolerance:g}"], rows))
    return passed


def count_worker(args: argparse.Namespace) -> None:
    """Under torchrun: the collectives of one layer, forward and backward, as the difference between
    a model of 2 layers and one of 1 (the embedding and the loss cancel out)."""
    from megassm.model import Mamba2LM, ModelConfig
    from parallel import init_parallel, record_communication

    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ctx = init_parallel(args.tp, args.cp, 1, args.sp, "nccl" if device.type == "cuda" else "gloo")
    rows = []
    for tokens in args.lengths:
        per_model = []
        for layers in (1, 2):
            torch.manual_seed(0)
            cfg = ModelConfig.from_preset(args.preset, n_layer=layers, ngroups=args.ngroups)
            model = Mamba2LM(cfg, ctx).to(device)  # a count: nothing compiled
            ids = torch.randint(0, model.cfg.vocab_size, (1, tokens // args.cp), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16), record_communication() as forward:
                loss = model(ids, labels=ids).sum()
            with record_communication() as backward:
                loss.backward()
            per_model.append((forward, backward))
        for direction, (one, two) in zip(("forward", "backward"), zip(*per_model)):
            layer = sorted((Counter(two) - Counter(one)).elements())  # the second layer's own collectives
            rows.append([str(tokens), direction, ", ".join(name for name, _ in layer) or "none", str(sum(size for _, size in layer))])
    if int(os.environ["RANK"]) == 0:
        print("BENCH_ROWS " + json.dumps(rows), flush=True)
    torch.distributed.destroy_process_group()


def join_fake_job(world_size: int) -> None:
    """Make this process rank 0 of a job of world_size ranks on torch's fake process group: no
    communication; an all-reduce leaves this rank's data, an all-gather or reduce-scatter zeros."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import parallel.collectives

    import megassm.job_store

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size))
    torch.distributed.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    for name in ("_all_gather", "_reduce_scatter"):  # their outputs are new tensors: never written on CUDA
        setattr(parallel.collectives, name, zeroing_output(getattr(parallel.collectives, name)))
    megassm.job_store.on_every_rank = lambda key, start, timeout: start()  # the fake store holds no values: this rank decides


def zeroing_output(collective: Callable[..., object]) -> Callable[..., object]:
    """The collective, its output zeroed first: garbage there (NaN, say) would make every step non-finite,
    and the trainer skips the update of such a step, so its time would not be a training step's."""
    def call(out: torch.Tensor, *args, **kwargs) -> object:
        out.zero_()
        return collective(out, *args, **kwargs)

    return call


def rank_worker(world_size: int, trainer_args: list[str]) -> int:
    """The trainer as rank 0 of world_size ranks, alone (--one-rank)."""
    from megassm.train import main as train_main

    join_fake_job(world_size)
    return train_main(trainer_args)


def profile_rank(args: argparse.Namespace) -> None:
    """One rank of tp x cp alone (fake process group): time per forward + backward of --layers layers
    (activation checkpointing, bf16 autocast, --seq-len tokens on this rank in two documents) and the
    device time by op and kernel, to find what a layout adds to one GPU's work."""
    from torch.profiler import ProfilerActivity, profile

    from megassm.model import Mamba2LM, ModelConfig, apply_activation_checkpointing
    from parallel import init_parallel

    join_fake_job(args.tp * args.cp)
    ctx = init_parallel(args.tp, args.cp, 1, args.sp)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, ngroups=args.ngroups, n_layer=args.layers)
    model = Mamba2LM(cfg, ctx).to(device)
    apply_activation_checkpointing(model)
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len), device=device)
    seq_idx = (torch.arange(args.seq_len, device=device) >= args.seq_len // 3).int()[None]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(ids, seq_idx, ids).sum()
        loss.backward()
        synchronize()

    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(5):
        step()
    print(f"tp{args.tp} x cp{args.cp}{' + SP' if args.sp else ''}, {args.layers} layers of {args.preset}, {args.seq_len:,} tokens on "
          f"this rank: {(time.perf_counter() - started) / 5 * 1e3:.1f} ms per forward + backward\n")
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]) as prof:
        step()
    print(prof.key_averages().table(sort_by=f"self_{device.type}_time_total", row_limit=30, max_name_column_width=70))


def collectives(args: argparse.Namespace) -> bool:
    """Per layer and direction: TP collectives (one all-reduce each way; all-gather + reduce-scatter
    under SP) and CP bytes (equal at every sequence length)."""
    cases = [("tp2", 2, 1, False, args.lengths[:1]), ("tp2+sp", 2, 1, True, args.lengths[:1]), ("cp2", 1, 2, False, args.lengths)]
    ok = True
    for name, tp, cp, sp, lengths in cases:
        done = torchrun(tp * cp, [__file__, "count", "--preset", args.preset, "--ngroups", str(args.ngroups), "--tp", str(tp),
                                  "--cp", str(cp), *(["--sp"] if sp else []), "--lengths", *map(str, lengths)], args.timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH_ROWS ")]
        if not lines:
            print(f"{name}: failed: {failure(done)}")
            ok = False
            continue
        rows = json.loads(lines[-1][len("BENCH_ROWS "):])
        print(f"\n{name}, collectives of one layer (bytes this rank sends or contributes):\n")
        print(markdown(["tokens", "direction", "collectives", "bytes"], rows))
        if cp > 1:
            ok &= len({(direction, size) for _, direction, _, size in rows}) == 2  # one size per direction, at every length
    return ok


def tokens_per_gpu(records: list[dict] | str) -> str:
    return records if isinstance(records, str) else f"{records[-1]['tokens_per_s_per_gpu']:,.0f}"


def tp_scaling(args: argparse.Namespace, tmp: Path) -> None:
    """tokens/s per GPU for tp = 1, 2, 4, 8 (dp the rest) at a fixed global batch. A TP rank holds 1/tp
    of each layer, so its micro batch is tp times tp1's, with sequence parallelism splitting what TP
    would replicate: every layout runs kernels of the same size (at tp1's micro batch a TP step is
    tp times as many launches of 1/tp of the work: bench/RESULTS.md)."""
    rows = []
    global_batch = max(args.global_batch, args.micro_batch * args.gpus)
    for tp in [t for t in (1, 2, 4, 8) if t <= args.gpus]:
        layout = argparse.Namespace(**{**vars(args), "global_batch": global_batch, "micro_batch": args.micro_batch * tp})
        result = train(layout, Path(tmp, f"tp{tp}"), tp, 1, sp=tp > 1, nproc=args.gpus)
        rows.append([f"tp{tp} x dp{args.gpus // tp}{' + SP' if tp > 1 else ''}", f"{global_batch} x {args.seq_len}",
                     f"{layout.micro_batch} x {args.seq_len}", tokens_per_gpu(result)])
    print(markdown(["layout", "global batch", "micro batch", "tokens/s per GPU"], rows) + "\n")


def cp_weak_scaling(args: argparse.Namespace, tmp: Path) -> None:
    """One sequence of --tokens-per-gpu x cp tokens on cp GPUs: tokens/s per GPU against cp = 1."""
    rows, base = [], None
    for cp in [c for c in (1, 2, 4, 8) if c <= args.gpus]:
        weak = argparse.Namespace(**{**vars(args), "seq_len": args.tokens_per_gpu * cp, "micro_batch": 1, "global_batch": 1})
        result = train(weak, Path(tmp, f"cp{cp}"), 1, cp, extra=("--train.activation_checkpointing=true",))
        speed = None if isinstance(result, str) else result[-1]["tokens_per_s_per_gpu"]
        base = speed if cp == 1 else base
        rows.append([f"cp{cp}", f"{weak.seq_len:,}", tokens_per_gpu(result), f"{speed / base:.0%}" if speed and base else "-"])
    print(markdown(["layout", "sequence", "tokens/s per GPU", "efficiency vs cp1"], rows) + "\n")


def longest_sequence(args: argparse.Namespace, tmp: Path) -> None:
    """Double one sequence on all GPUs with CP, from --tokens-per-gpu x GPUs, until a run fails (or --max-seq-len)."""
    longest, seq_len = None, args.tokens_per_gpu * args.gpus
    while seq_len <= args.max_seq_len:
        trial = argparse.Namespace(**{**vars(args), "seq_len": seq_len, "micro_batch": 1, "global_batch": 1, "steps": 2})
        result = train(trial, Path(tmp, f"long{seq_len}"), 1, args.gpus, extra=("--train.activation_checkpointing=true",))
        if isinstance(result, str):
            print(f"cp{args.gpus}, one sequence of {seq_len:,} tokens: fails: {result[:150]}")
            break
        print(f"cp{args.gpus}, one sequence of {seq_len:,} tokens: trains, {tokens_per_gpu(result)} tokens/s per GPU, "
              f"{result[-1]['mem_gib']:.1f} GiB")
        longest, seq_len = seq_len, seq_len * 2
    limit = " (the search stops at --max-seq-len)" if seq_len > args.max_seq_len else ""
    print(f"\nlongest single sequence trained on {args.gpus} GPUs: {longest or 'none'} tokens{limit}")


SCALING_PARTS = {"tp": tp_scaling, "cp": cp_weak_scaling, "longest": longest_sequence}


def scaling(args: argparse.Namespace) -> bool:
    """780m (or --preset): the --parts asked for, in that order (each run starts a model anew)."""
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            SCALING_PARTS[part](args, Path(tmp))
    return True


def reshard(args: argparse.Namespace) -> bool:
    """Steps 1-N with layout A (a checkpoint at N/2), against steps N/2+1..N resumed from it with layout B."""
    (a_name, a_tp, a_cp), (b_name, b_tp, b_cp) = (("tp2xcp2", 2, 2), ("cp4", 1, 4)) if args.gpus >= 4 else (("tp2", 2, 1), ("cp2", 1, 2))
    half = args.steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        first = train(args, Path(tmp, "a"), a_tp, a_cp, extra=(f"--checkpoint.every={half}",))
        if isinstance(first, str):
            raise SystemExit(f"bench_parallel: layout {a_name} failed: {first}")
        shutil.copytree(Path(tmp, "a", "checkpoints", f"step_{half}"), Path(tmp, "b", "checkpoints", f"step_{half}"))
        resumed = train(args, Path(tmp, "b"), b_tp, b_cp)
        if isinstance(resumed, str):
            raise SystemExit(f"bench_parallel: resuming with {b_name} failed: {resumed}")
    loss = largest_difference(resumed, first, "loss", range(half + 1, args.steps + 1))
    print(f"written by {a_name} at step {half}, resumed by {b_name}: steps {half + 1}-{args.steps}, largest loss difference "
          f"{loss:.1e} against {a_name} uninterrupted ({'PASS' if loss <= args.tolerance else 'FAIL'}, tolerance {args.tolerance:g})")
    return loss <= args.tolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["check", "collectives", "scaling", "reshard", "profile", "count", "rank"])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count() or 4, help="GPUs (or CPU processes) to use")
    parser.add_argument("--preset", default=None, help="model preset (default: mamba2-130m; mamba2-780m for scaling)")
    parser.add_argument("--ngroups", type=int, default=8,
                        help="model.ngroups of every run: TP splits the groups; the published presets have 1 (configs/mamba2-1.3b.toml)")
    parser.add_argument("--data", default="data/builtin")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=2e-2, help="largest relative loss difference (bf16)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072], help="collectives: total tokens of a sequence")
    parser.add_argument("--tokens-per-gpu", type=int, default=32768, help="scaling: CP weak scaling and the longest-sequence search")
    parser.add_argument("--max-seq-len", type=int, default=1 << 21, help="scaling: stop the longest-sequence search here")
    parser.add_argument("--layouts", nargs="+", choices=[layout[0] for layout in LAYOUTS], default=[layout[0] for layout in LAYOUTS],
                        help="check: which layouts (those that need more than --gpus are left out)")
    parser.add_argument("--parts", nargs="+", choices=list(SCALING_PARTS), default=list(SCALING_PARTS),
                        help="scaling: which measurements (each run starts the model anew: split them over several calls)")
    parser.add_argument("--one-rank", action="store_true",
                        help="scaling: each layout's rank 0 alone on one device, without communication (see above)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for each run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key for every training run")
    parser.add_argument("--tp", type=int, default=1, help="profile: the layout of which one rank runs")
    parser.add_argument("--cp", type=int, default=1, help="profile: the layout of which one rank runs")
    parser.add_argument("--sp", action="store_true", help="profile: with sequence parallelism")
    parser.add_argument("--layers", type=int, default=8, help="profile: the model's layers")
    args, trainer_args = parser.parse_known_args()
    if args.what == "rank":
        sys.exit(rank_worker(args.gpus, trainer_args))
    if trainer_args:
        parser.error(f"unrecognized arguments: {' '.join(trainer_args)}")
    if args.one_rank and args.what != "scaling":
        parser.error("--one-rank measures speed and memory only (its losses are not the job's): use it with scaling")
    args.preset = args.preset or ("mamba2-780m" if args.what == "scaling" else "mamba2-130m")
    if args.what == "count":
        count_worker(args)
        return
    if args.what == "profile":
        profile_rank(args)
        return
    require_prepared_data(args.data, "bench_parallel")
    ok = {"check": check, "collectives": collectives, "scaling": scaling, "reshard": reshard}[args.what](args)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

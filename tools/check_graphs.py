"""The blocks as CUDA graphs under DP, TP, SP and CP against the same layout without graphs.

NCCL refuses two ranks on one device, so by default the ranks of each layout share one GPU joined by gloo: between
the graphs the collectives run on CUDA tensors as they would on NCCL (megassm/model/cuda_graphs.py). With
`--backend nccl` each rank takes its own GPU (`LOCAL_RANK`) and NCCL joins them, as in the trainer. Each rank
builds the model twice from one seed, as the trainer runs it (Triton kernels, compiled norms, bf16 autocast;
the SSD's states kept where the trainer's default keeps them; the DDP engine, which sums gradients over DP x CP),
one with CUDA graphs; for a few batches of one shape (documents packed differently in each; in --micro-batches
micro batches, their gradients summed as the trainer sums them; a pass without gradients after each, as validation
between steps) it compares the loss and every gradient of the graphed model with the eager one's (within --tolerance,
a NaN never within it), beside the eager model's own difference from a second eager pass. It also compares the eager
model with one process on the whole batch (each gradient with this rank's piece of one process's), the same kernels:
what the layout's own code computes, such as CP's state exchange inside the fused mixer, checked where NCCL would
need several GPUs. Without CUDA both models run eagerly: how the tool itself is tested (tests/test_check_graphs.py).

    python tools/check_graphs.py                                  # the five default layouts on 4 layers of mamba2-130m
    python tools/check_graphs.py --pattern M-M*M- --activation-checkpointing
    python tools/check_graphs.py --layouts dp2 tp2xdp2+sp --micro-batches 2
    python tools/check_graphs.py --backend nccl --layouts cp4 tp2xcp2 tp4+sp tp2xcp2xdp2   # one GPU per rank
    python tools/check_graphs.py --engine deepspeed --layouts tp2+sp dp2   # ZeRO-1: its gradients before its step
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

import torch

from bench import markdown  # tools/ is on the path when run as a script
from bench_ssd import relative_error
from bench_parallel import failure, torchrun

DEFAULT_LAYOUTS = ["dp2", "tp2", "tp2+sp", "cp2", "tp2xcp2"]
_DIMENSIONS = ("tp", "cp", "dp")


def layout(name: str) -> tuple[int, int, int, bool]:
    """(tp, cp, dp, sequence parallelism) of a layout's name: its sizes in the order tp, cp, dp, joined by x, each
    left out where 1, then +sp: dp2, tp2+sp, cp4, tp2xcp2xdp2."""
    sizes, parts = dict.fromkeys(_DIMENSIONS, 1), re.findall(r"(tp|cp|dp)([1-9]\d*)", name)
    sp = name.endswith("+sp")
    order = [_DIMENSIONS.index(dimension) for dimension, _ in parts]
    if "x".join(d + n for d, n in parts) + "+sp" * sp != name or order != sorted(set(order)):
        raise argparse.ArgumentTypeError(f"{name!r} is not a layout: sizes in the order tp, cp, dp joined by x, then +sp "
                                         "(dp2, tp2+sp, cp4, tp2xcp2xdp2)")
    sizes.update((dimension, int(size)) for dimension, size in parts)
    tp, cp, dp = sizes.values()
    if tp * cp * dp < 2 or (sp and tp < 2):
        raise argparse.ArgumentTypeError(f"layout {name!r}: needs at least two ranks, and +sp needs tp > 1")
    return tp, cp, dp, sp


def worker(args: argparse.Namespace) -> None:
    """One rank: the graphed and the eager model on the same batches; rank 0 prints the largest differences."""
    from megassm.model import (Mamba2LM, ModelConfig, apply_activation_checkpointing, apply_cuda_graphs, apply_kernels,
                               apply_ssd_state_keeping)
    from megassm.auto_choices import cuda_graph_groups
    from parallel import DDPEngine, ParallelContext, init_parallel, local_piece, param_roles

    if args.engine == "deepspeed":
        if args.backend == "gloo":
            os.environ["LOCAL_RANK"] = "0"  # the GPU DeepSpeed takes: the one all ranks share
        from deepspeed.utils import safe_get_full_grad
        from parallel.deepspeed_engine import DeepSpeedEngine

    tp, cp, dp, sp = layout(args.layout)
    micro = args.micro_batches
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if args.backend == "nccl" else 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    ctx = init_parallel(tp, cp, dp, sp, backend=args.backend)
    preset = ModelConfig.from_preset(args.preset)
    cfg = dataclasses.replace(preset, n_layer=len(args.pattern), pattern=args.pattern if set(args.pattern) != {"M"} else "",
                              ngroups=args.ngroups, mlp_hidden=preset.mlp_hidden or 4 * preset.d_model)

    def build(graphs: bool, context: ParallelContext = ctx) -> tuple[Mamba2LM, DDPEngine | DeepSpeedEngine]:
        torch.manual_seed(0)
        model = Mamba2LM(cfg, context).to(device)
        apply_kernels(model, "auto", True, "megassm")
        if args.activation_checkpointing:
            apply_activation_checkpointing(model)
        apply_ssd_state_keeping(model)
        if graphs:
            apply_cuda_graphs(model, cuda_graph_groups(context, args.engine, args.zero_stage))  # the trainer's groups
        groups = [{"params": list(model.parameters())}]
        if args.engine == "deepspeed" and context is ctx:
            return model, DeepSpeedEngine(model, context, groups, lr=0.0, zero_stage=args.zero_stage, accumulation_steps=micro,
                                          graphed=graphs)
        # As the trainer: with several micro batches a graph's gradient buffers are added into .grad, zeroed in place.
        return model, DDPEngine(model, context, groups, lr=0.0, zero_in_place=graphs and micro > 1, graphed=graphs)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and args.precision == "bf16", cache_enabled=False)

    def loss_and_grads(model: Mamba2LM, engine: DDPEngine | DeepSpeedEngine, ids: torch.Tensor, seq_idx: torch.Tensor, labels: torch.Tensor,
                       targets: int) -> list[torch.Tensor]:
        """The loss of these tokens over all `targets` of the global batch (summed over the ranks: the whole batch's
        loss) and every gradient, as the trainer computes them, in --micro-batches micro batches; then a validation
        pass of the first micro batch (no gradients), as between the trainer's steps."""
        pieces = list(zip(*(t.chunk(micro) for t in (ids, seq_idx, labels))))
        loss = torch.zeros((), device=device)
        for i, piece in enumerate(pieces):
            with engine.micro_step(is_last=i == micro - 1):
                with autocast():
                    piece_loss = engine(*piece).sum() / targets
                engine.backward(piece_loss)
            loss += piece_loss.detach()
        if isinstance(engine, DDPEngine):
            group = engine.ctx.dp_cp_group
            engine.finish_gradients()
            grads = [p.grad.clone() for p in model.parameters()]
            for p in model.parameters():
                p.grad = None if micro == 1 else p.grad.zero_()
        else:  # ZeRO's gradient of each parameter (this TP rank's piece), then a step at rate 0, which drops them
            group = engine.dp_cp_group
            grads = [safe_get_full_grad(p).clone() for p in model.parameters()]
            engine.step(lr=0.0, max_norm=0.0)
        if group is not None:
            torch.distributed.all_reduce(loss, group=group)
        out = [loss, *grads]
        with torch.no_grad(), autocast():
            model(*pieces[0])
        return out

    eager, graphed = build(graphs=False), build(graphs=True)
    one_process = build(graphs=False, context=ParallelContext())
    roles = param_roles(eager[0])
    mine_of = lambda name, full: full if name == "loss" else local_piece(full, roles[name], ctx.tp_group)  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    rows, length = args.batch, args.seq_len
    names = ["loss", *(name for name, _ in eager[0].named_parameters())]
    worst, noise, from_one = {}, {}, {}
    for trial in range(args.batches):
        ids = torch.randint(0, cfg.vocab_size, (rows * dp, length), generator=generator)
        labels = torch.randint(0, cfg.vocab_size, (rows * dp, length), generator=generator)
        starts = torch.randint(1, length, (rows * dp, 3), generator=generator)
        seq_idx = (torch.arange(length)[None, None] >= starts[..., None]).sum(1)
        targets = labels.numel()  # random labels: every one a target
        mine = (slice(ctx.dp_rank * rows, (ctx.dp_rank + 1) * rows), slice(ctx.cp_rank * length // cp, (ctx.cp_rank + 1) * length // cp))
        batch = [t[mine].to(device) for t in (ids, seq_idx, labels)]
        want = loss_and_grads(*eager, *batch, targets)
        got = loss_and_grads(*graphed, *batch, targets)
        if trial == 0:
            again = loss_and_grads(*eager, *batch, targets)
            noise = {n: relative_error(a, w) for n, a, w in zip(names, again, want)}
        for n, g, w in zip(names, got, want):
            worst[n] = max(worst.get(n, 0.0), relative_error(g, w))
        whole = loss_and_grads(*one_process, *(t.to(device) for t in (ids, seq_idx, labels)), targets)
        for n, e, w in zip(names, want, whole):
            from_one[n] = max(from_one.get(n, 0.0), relative_error(e, mine_of(n, w)))
    graphs = graphed[0].graphs
    if cuda and graphs is None:
        raise RuntimeError("the graphed model never captured its blocks")
    pieces = None if graphs is None else graphs.pieces
    results = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, dict(worst=worst, noise=noise, from_one=from_one, pieces=pieces))
    if torch.distributed.get_rank() == 0:
        print("CHECK_GRAPHS " + json.dumps(results), flush=True)
    torch.distributed.destroy_process_group()


def run_layout(args: argparse.Namespace, name: str) -> list[dict] | str:
    """Rank 0's gathered results of one layout, or the line that says why its job failed."""
    tp, cp, dp, _ = layout(name)
    done = torchrun(tp * cp * dp, [__file__, "--worker", "--layout", name, "--backend", args.backend, "--preset", args.preset,
                                   "--pattern", args.pattern, "--ngroups", str(args.ngroups), "--batch", str(args.batch),
                                   "--seq-len", str(args.seq_len), "--batches", str(args.batches),
                                   "--micro-batches", str(args.micro_batches), "--precision", args.precision, "--engine", args.engine,
                                   "--zero-stage", str(args.zero_stage),
                                   *(["--activation-checkpointing"] if args.activation_checkpointing else [])], args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("CHECK_GRAPHS ")]
    if not lines:
        return failure(done)
    return json.loads(lines[-1][len("CHECK_GRAPHS "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS,
                        help="sizes in the order tp, cp, dp joined by x, then +sp: dp2, tp2+sp, cp4, tp2xcp2xdp2")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                        help="gloo: the ranks share one GPU; nccl: one GPU per rank, as the trainer runs")
    parser.add_argument("--preset", default="mamba2-130m")
    parser.add_argument("--pattern", default="MMMM", help="one symbol per block: M Mamba-2, * attention, - MLP")
    parser.add_argument("--ngroups", type=int, default=2, help="B/C groups: tp must divide them")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=1, help="per batch, each rank's rows in this many micro batches")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--engine", choices=["ddp", "deepspeed"], default="ddp", help="the data-parallel engine of both models")
    parser.add_argument("--zero-stage", type=int, choices=[1, 2], default=1, help="with --engine deepspeed")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="the trainer's bf16 autocast, or fp32 throughout (TF32 matmuls): the tighter check against one process")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="graphed vs eager: largest relative difference of a loss or gradient (to its largest entry)")
    parser.add_argument("--one-process-tolerance", type=float, default=None,
                        help="eager vs one process (default 1e-1 in bf16, 5e-3 in fp32: on an H200 a split computation's bf16 roundings "
                             "reach 1.8e-2 under dp2, 6.0e-2 under TP (dt_bias's gradient); in fp32 3.6e-4, run 26)")
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.batch % args.micro_batches:
        parser.error(f"--micro-batches {args.micro_batches} must divide --batch {args.batch}")
    for name in args.layouts:
        try:
            tp, cp, dp, _ = layout(name)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
        if args.backend == "nccl" and tp * cp * dp > torch.cuda.device_count():
            parser.error(f"--backend nccl runs each rank on its own GPU: layout {name} needs {tp * cp * dp}, "
                         f"this machine has {torch.cuda.device_count()}")
    one_process_tolerance = args.one_process_tolerance
    if one_process_tolerance is None:
        one_process_tolerance = {"bf16": 1e-1, "fp32": 5e-3}[args.precision]
    if not torch.cuda.is_available():
        print("no CUDA device: both models run eagerly (CUDA graphs exist only on CUDA), which tests this tool alone")
    rows, ok = [], True
    for name in args.layouts:
        result = run_layout(args, name)
        if isinstance(result, str):
            rows.append([name, "-", "-", "-", f"failed: {result[:200]}"])
            ok = False
            continue
        worst = {n: max(r["worst"][n] for r in result) for n in result[0]["worst"]}
        noise = max(max(r["noise"].values()) for r in result)
        worst_name, largest = max(worst.items(), key=lambda item: item[1])
        from_one = {n: max(r["from_one"][n] for r in result) for n in result[0]["from_one"]}
        one_name, one_largest = max(from_one.items(), key=lambda item: item[1])
        passed = largest <= args.tolerance and one_largest <= one_process_tolerance
        ok &= passed
        pieces = result[0]["pieces"]
        rows.append([name, "-" if pieces is None else " / ".join(map(str, pieces)), f"{worst['loss']:.1e}",
                     f"{largest:.1e} ({worst_name}); eager again {noise:.1e}",
                     f"{from_one['loss']:.1e}; {one_largest:.1e} ({one_name})",
                     "PASS" if passed else "FAIL"])
    print(markdown(["layout", "graphs forward / backward (rank 0)", "graphed vs eager: loss", "largest gradient difference",
                    "eager vs one process: loss; largest gradient difference", "result"], rows))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

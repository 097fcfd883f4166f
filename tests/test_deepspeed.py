"""The DeepSpeed ZeRO engine against one process doing the same global batches with plain AdamW and
clipping: per step the loss and the gradient norm, after the steps every weight and AdamW's state, in
float32. Several layouts share one spawned run: starting processes and DeepSpeed is the slow part."""

import copy
import gc
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("deepspeed")
from deepspeed.accelerator import get_accelerator  # noqa: E402

from megassm.auto_choices import state_bytes_per_parameter  # noqa: E402
from megassm.config import load_config  # noqa: E402
from megassm.model import Mamba2LM, ModelConfig  # noqa: E402
from parallel import ParallelContext, ParamRole, init_parallel, local_piece, param_roles, roles_of  # noqa: E402
from parallel.context import group_rank, group_size  # noqa: E402
from parallel.collectives import all_gather, all_reduce, collectives_through  # noqa: E402
from parallel import deepspeed_engine  # noqa: E402
from parallel.deepspeed_engine import DeepSpeedEngine, deal_by_size, stage_1_and_2  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.test_parallel import relative_error  # noqa: E402

CFG = ModelConfig.from_preset("debug", chunk_size=8)
SEQLEN, ROWS, MICRO_BATCHES, DP = 32, 2, 2, 2  # rows per DP rank and micro batch
LRS = [1e-3, 3e-3, 2e-3, 1e-3]
MAX_NORMS = [0.5, 0.0, 1e3, 0.5]  # clipped, clipping off, not reached, clipped
# eps well above the gradients' fp32 rounding: where |g| ~ eps, AdamW turns a rounding error d of g into an
# update error lr * d / eps. With 1e-8, one process summing its batch in 4 chunks instead of 1 already
# moves some weights by 4e-5 (relative) in 3 steps; losses, norms and AdamW's moments check the gradients.
BETAS, EPS = (0.9, 0.95), 1e-5
TOLERANCE = 1e-5
# ZeRO's bucket in these runs, a tenth of the debug model's parameters: several buckets per backward, as in a real model.
BUCKET_ELEMENTS = 10_000


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(input ids, labels, document ids) of each step, the rows of every micro batch and DP rank."""
    g = torch.Generator().manual_seed(3)
    rows = MICRO_BATCHES * DP * ROWS
    batches = []
    for _ in LRS:
        ids = torch.randint(0, CFG.vocab_size, (rows, SEQLEN), generator=g)
        labels = torch.randint(0, CFG.vocab_size, (rows, SEQLEN), generator=g)
        labels[0, :5] = -100
        seq_idx = torch.zeros(rows, SEQLEN, dtype=torch.long)
        seq_idx[1::2, 13:] = 1  # a document boundary inside the first CP slice
        batches.append((ids, labels, seq_idx))
    return batches


def param_groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}, copy.deepcopy(optimizer.state_dict())


def reference():
    """One process, the whole global batch per step: the loss and the norm of every step, the weights
    and AdamW's state before the last step, and the weights after it."""
    torch.manual_seed(0)
    model = Mamba2LM(CFG)
    optimizer = torch.optim.AdamW(param_groups(model), lr=LRS[0], betas=BETAS, eps=EPS, fused=True)  # as the engines' (their param_groups)
    losses, norms = [], []
    for (ids, labels, seq_idx), lr, max_norm in zip(global_batches(), LRS, MAX_NORMS):
        before_last = snapshot(model, optimizer)
        loss = model(ids, seq_idx=seq_idx, labels=labels).sum() / (labels != -100).sum()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf).item())
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, norms, before_last, snapshot(model, optimizer)[0]


def train_step(engine: DeepSpeedEngine, ctx: ParallelContext, step: int, loss_scale: float = 1.0) -> tuple[float, float]:
    """One step on this rank's part of the global batch (its rows, its CP slice): the loss of the whole
    batch (summed over DP x CP) and the norm the engine returns."""
    ids, labels, seq_idx = global_batches()[step]
    count = (labels != -100).sum()
    cols = slice(ctx.cp_rank * SEQLEN // ctx.cp, (ctx.cp_rank + 1) * SEQLEN // ctx.cp)
    total = torch.zeros(())
    for micro in range(MICRO_BATCHES):
        first = (micro * DP + ctx.dp_rank) * ROWS
        rows = slice(first, first + ROWS)
        with engine.micro_step(is_last=micro == MICRO_BATCHES - 1):
            loss = engine(ids[rows, cols], seq_idx=seq_idx[rows, cols], labels=labels[rows, cols]).sum() / count
            engine.backward(loss * loss_scale)
        total += loss.detach()
    norm = engine.step(LRS[step], MAX_NORMS[step])
    return all_reduce(total, ctx.dp_cp_group).item(), norm


def local_state(state: dict, roles: list[ParamRole], ctx: ParallelContext) -> dict:
    """This TP rank's pieces of a one-process optimizer state (roles: of its parameters, in order)."""
    pieces = {i: {key: local_piece(value, roles[i], ctx.tp_group) if value.dim() else value for key, value in entry.items()}
              for i, entry in state["state"].items()}
    return {"state": pieces, "param_groups": state["param_groups"]}


def full_weight(p: nn.Parameter, role: ParamRole, ctx: ParallelContext) -> torch.Tensor:
    """The logical tensor assembled from every TP rank's piece."""
    if role.tp_dim is None or ctx.tp == 1:
        return p.detach()
    return all_gather(p.detach(), ctx.tp_group, role.tp_dim)


def check(what: str, got: float | torch.Tensor, want: float | torch.Tensor) -> None:
    error = relative_error(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64))
    assert error < TOLERANCE, f"rank {dist.get_rank()}: {what} differs by {error:.2e}"


def check_callers_autocast(engine: DeepSpeedEngine, model: nn.Module, layout: str) -> None:
    """Under the caller's bf16 autocast, its cache setting included (CUDA graphs need the cache off), the engine
    computes what the model does under it. (On CUDA, DeepSpeed's forward alone switches an outer autocast off; the
    engine does so on every device and enters the caller's again inside, which is what this checks on the CPU.)"""
    ids, labels, _ = global_batches()[0]
    caches = []
    hook = model.register_forward_pre_hook(lambda *_: caches.append(torch.is_autocast_cache_enabled()))
    with torch.no_grad():
        full = model(ids[:ROWS], labels=labels[:ROWS])
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            want, got = model(ids[:ROWS], labels=labels[:ROWS]), engine(ids[:ROWS], labels=labels[:ROWS])
    hook.remove()
    assert not torch.equal(want, full) and torch.equal(got, want), f"{layout}: the engine ignored the caller's autocast"
    assert caches[1:] == [False, False], f"{layout}: the engine turned on autocast's cache"


def check_sequence_parallel_hook(ctx: ParallelContext, layout: str) -> None:
    """A replicated parameter's gradient hook sums it over TP, but not during a CUDA-graph capture (collectives handed
    to a runner), whose replay hands the gradient to the hook again: summed in the graph too, it would be summed twice."""
    hook = deepspeed_engine._sum_over_tp_hook(ctx.tp_group)
    grad = torch.full((3,), float(group_rank(ctx.tp_group) + 1))
    handed = []
    with collectives_through(handed.append):
        assert hook(grad) is grad and not handed, f"{layout}: the hook summed a gradient during a capture"
    tp = group_size(ctx.tp_group)
    assert torch.equal(hook(grad), torch.full((3,), tp * (tp + 1) / 2)), f"{layout}: the hook did not sum over TP"


def tensor_bytes() -> int:
    """The bytes of every tensor storage this process holds, each storage once: the tensors Python holds and their
    gradients (which have no Python object until read)."""
    gc.collect()
    storages = {}
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors + [t.grad for t in tensors if t.grad is not None]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


class HeldBytes:
    """What the engine holds beyond the model's weights, counted while `counting` after each micro batch's backward and
    at AdamW's step (counting takes a while: one step, the second, where AdamW's moments exist)."""

    def __init__(self, engine: DeepSpeedEngine, before_engine: int):
        self.before_engine, self.counting = before_engine, False
        self.after_backward, self.at_step = [], []
        backward = engine.backward
        engine.backward = lambda loss: (backward(loss), self.count(self.after_backward))
        engine.optimizer.register_step_post_hook(lambda *_: self.count(self.at_step))

    def count(self, into: list[int]) -> None:
        if self.counting:
            into.append(tensor_bytes() - self.before_engine)

    def check(self, layout: str, model: nn.Module, tp: int, zero_stage: int, dp: int = DP) -> None:
        """Against the memory estimate's bytes per parameter, within two bytes a parameter: DeepSpeed held 0.3-1.7 more on
        models of 1.9M to 0.1M parameters (less the larger the model; not identified). At the step, with the activations
        gone, it copies the gradient's part once more."""
        cfg = load_config(None, ["--model.preset=debug", "--parallel.engine=deepspeed", f"--parallel.zero_stage={zero_stage}",
                                 f"--parallel.tp={tp}", f"--parallel.dp={dp}", f"--data.global_batch={dp * MICRO_BATCHES}",
                                 "--data.path=unused"], world_size=tp * dp)
        assert cfg.accumulation_steps == MICRO_BATCHES
        params = sum(p.numel() for p in model.parameters())
        state, slack = params * (state_bytes_per_parameter(cfg) - 4), 2 * params
        most = max(self.after_backward)
        assert state <= most <= state + slack, f"{layout}: {most / params:.2f} bytes a parameter, estimate {state / params:.2f}"
        assert max(self.at_step) <= state + params * 4 / dp + slack, f"{layout}: {max(self.at_step) / params:.2f} bytes a parameter"


def check_layout(tp: int, cp: int, sequence_parallel: bool, zero_stage: int, resume: bool, want) -> None:
    """Train all but the last step and compare; with resume, skip a step whose gradient is NaN on a fresh engine, load
    the one-process weights and AdamW state into it (after that step: ZeRO's copy of the weights must be read again),
    and take the last step."""
    losses, norms, (weights, state), last_weights = want
    ctx = init_parallel(tp, cp, DP, sequence_parallel, backend="gloo")
    layout = f"tp{tp} cp{cp} dp{DP}{' sp' if sequence_parallel else ''} zero{zero_stage}"
    torch.manual_seed(0)
    model = Mamba2LM(CFG, ctx)
    counts = cp == 1  # under CP the DP x CP ranks' partitions of this small model differ by up to 2 bytes a parameter
    before_engine = tensor_bytes() if counts else 0
    engine = DeepSpeedEngine(model, ctx, param_groups(model), LRS[0], BETAS, EPS, zero_stage, MICRO_BATCHES)
    held = HeldBytes(engine, before_engine)
    for step in range(len(LRS) - 1):
        held.counting = counts and step == 1
        loss, norm = train_step(engine, ctx, step)
        check(f"{layout}: loss of step {step}", loss, losses[step])
        check(f"{layout}: gradient norm of step {step}", norm, norms[step])
    if counts:
        held.check(layout, model, tp, zero_stage)
    roles = param_roles(model)
    for name, p in model.named_parameters():
        check(f"{layout}: {name}", full_weight(p, roles[name], ctx), weights[name])
    got = engine.state_dict()
    assert got["param_groups"] == state["param_groups"], layout
    wanted = local_state(state, roles_of(model, engine.params), ctx)["state"]
    kept = [None] * group_size(ctx.dp_cp_group)  # each owner's parameters and the elements of their state
    dist.all_gather_object(kept, {i: sum(v.numel() for v in entry.values() if v.dim()) for i, entry in got["state"].items()},
                           group=ctx.dp_cp_group)
    assert sorted(i for owned in kept for i in owned) == sorted(wanted), f"{layout}: each parameter's state on one owner"
    totals, largest = [sum(owned.values()) for owned in kept], max(n for owned in kept for n in owned.values())
    assert max(totals) - min(totals) <= largest, f"{layout}: owners keep {totals} elements, more than a parameter apart"
    for i, entry in got["state"].items():
        for key, value in entry.items():
            check(f"{layout}: AdamW {key} of parameter {i}", value, wanted[i][key])
    check_callers_autocast(engine, model, layout)
    if sequence_parallel:
        check_sequence_parallel_hook(ctx, layout)
    if not resume:
        return

    torch.manual_seed(1)
    model = Mamba2LM(CFG, ctx)
    engine = DeepSpeedEngine(model, ctx, param_groups(model), LRS[0], BETAS, EPS, zero_stage, MICRO_BATCHES)
    before = {name: full_weight(p, roles[name], ctx).clone() for name, p in model.named_parameters()}
    last = len(LRS) - 1
    _, norm = train_step(engine, ctx, last, loss_scale=math.nan)
    assert not math.isfinite(norm), f"{layout}: a NaN gradient gave the norm {norm}"
    for name, p in model.named_parameters():
        assert torch.equal(full_weight(p, roles[name], ctx), before[name]), f"{layout}: the NaN step changed {name}"
    with torch.no_grad():  # into the model, as load_checkpoint does
        for name, p in model.named_parameters():
            p.copy_(local_piece(weights[name], roles[name], ctx.tp_group))
    engine.weights_loaded()
    engine.load_state_dict(local_state(state, roles_of(model, engine.params), ctx))
    loss, norm = train_step(engine, ctx, last)
    check(f"{layout}: loss after resuming", loss, losses[last])
    check(f"{layout}: gradient norm after resuming", norm, norms[last])
    for name, p in model.named_parameters():
        check(f"{layout}: {name} after resuming", full_weight(p, roles[name], ctx), last_weights[name])


def check_layouts(layouts: list[tuple]) -> None:
    deepspeed_engine.REDUCE_BUCKET_ELEMENTS = BUCKET_ELEMENTS
    want = reference()
    for layout in layouts:
        check_layout(*layout, want)


# (tp, cp, sequence_parallel, zero_stage, resume), each with DP = 2
@pytest.mark.parametrize("world_size, layouts", [
    (2, [(1, 1, False, 1, True), (1, 1, False, 2, True)]),
    (4, [(2, 1, False, 2, True), (2, 1, True, 2, False), (1, 2, False, 1, False)]),
], ids=["dp2", "dp2xtp2-dp2xcp2"])
def test_zero_matches_one_process(world_size, layouts):
    run_distributed(check_layouts, world_size, layouts)


def check_one_replica() -> None:
    """What ZeRO holds with nothing to split it over: where the estimate's terms split over DP x CP differ from whole ones
    (at 2 replicas 4 + 16/2 = 8 + 8/2). And that the host never waits for the device: ZeRO's own check of the norm,
    which reads it on the host, never sees it (the step returns it unread, a tensor), nor does its mask of a non-finite
    norm run (a copy from the host), nor is the device synchronized."""
    deepspeed_engine.REDUCE_BUCKET_ELEMENTS = BUCKET_ELEMENTS
    ctx = init_parallel(1, 1, 1, False, backend="gloo")
    read_on_host, copied_from_host = [], []
    stage_1_and_2.is_invalid_grad_norm = lambda norm: read_on_host.append(norm) or False
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = lambda norm, **kwargs: copied_from_host.append(norm)
    accelerator, synchronized = get_accelerator(), []
    accelerator.synchronize = lambda *args, **kwargs: synchronized.append(args)
    for zero_stage in (1, 2):
        model = Mamba2LM(CFG, ctx)
        before_engine = tensor_bytes()
        engine = DeepSpeedEngine(model, ctx, param_groups(model), LRS[0], BETAS, EPS, zero_stage, MICRO_BATCHES)
        held = HeldBytes(engine, before_engine)
        for step in range(len(LRS)):  # DeepSpeed's throughput timer would synchronize from its third step on
            held.counting = step == 1
            _, norm = train_step(engine, ctx, step)
            assert torch.is_tensor(norm), f"zero{zero_stage}: the step read its norm"
        held.check(f"dp1 zero{zero_stage}", model, 1, zero_stage, dp=1)
        del model, engine, held
    assert not read_on_host, f"ZeRO's host check was handed {read_on_host}"
    assert not copied_from_host, f"ZeRO's mask copied its value from the host {len(copied_from_host)} times"
    assert not synchronized, f"DeepSpeed synchronized the device {len(synchronized)} times"
    # A ZeRO that checks no norm (as if another DeepSpeed release): the update is skipped, then the step says so.
    model = Mamba2LM(CFG, ctx)
    engine = DeepSpeedEngine(model, ctx, param_groups(model), LRS[0], BETAS, EPS, 1, MICRO_BATCHES)
    before = copy.deepcopy(model.state_dict())
    engine.zero.compute_grad_norm = False
    with pytest.raises(RuntimeError, match="checked its gradient norm 0 times"):
        train_step(engine, ctx, 0)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items()), "an unchecked step updated"


def test_zero_on_one_replica_holds_what_the_estimate_counts():
    run_distributed(check_one_replica, 1)


def test_stage_3_is_refused():
    with pytest.raises(ValueError, match="Stage 3 would shard parameters that tensor parallelism already holds"):
        DeepSpeedEngine(nn.Linear(2, 2), ParallelContext(), [], 1e-3, zero_stage=3)


def test_optimizer_state_owners_are_dealt_parameters_by_size():
    """An embedding first, then many small tensors: each owner keeps about its share of the state."""
    sizes = [10] + [1] * 10
    owners = deal_by_size(sizes, 2)
    assert [sum(s for s, o in zip(sizes, owners) if o == owner) for owner in range(2)] == [10, 10]
    assert deal_by_size([3, 3, 3, 3], 4) == [0, 1, 2, 3]


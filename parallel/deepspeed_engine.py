"""The DeepSpeed ZeRO data-parallel engine (stage 1: optimizer state sharded over DP x CP; stage 2:
gradients too), with the same calls as DDPEngine, so the trainer switches with `parallel.engine`.

DeepSpeed sees our mesh through its model-parallel unit: its data-parallel group is DP x CP (the
ranks that saw different tokens), its model-parallel group is TP, and every TP-sharded parameter
(parallel/roles.py) is marked `tensor_model_parallel`, so its gradient norm sums sharded squares over TP and counts
replicated parameters once. Parameters stay fp32 (the trainer autocasts); DeepSpeed's own fp16/bf16
stay off. Stage 3 is refused: it would shard parameters that our TP layers already hold sharded.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup

from parallel.collectives import all_reduce, handed_over
from parallel.context import ParallelContext, group_rank, group_size
from parallel.data_parallel import clip_on_device, load_adamw_state, make_adamw
from parallel.graph_stream import engine_stream
from parallel.roles import roles_of

try:
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_optimizer_state, safe_set_full_optimizer_state
    from packaging.version import Version  # a dependency of DeepSpeed
except ImportError as error:
    raise ImportError("parallel.engine = \"deepspeed\" needs DeepSpeed: pip install 'megassm[deepspeed]'") from error

# Older releases ignore "gradient_allreduce_op" (DeepSpeed PR 8232) and silently average the gradients.
if Version(deepspeed.__version__) < Version("0.19.8"):
    raise ImportError(f"DeepSpeed {deepspeed.__version__} is too old for megassm: pip install 'megassm[deepspeed]' (deepspeed 0.19.8)")


# Gradient elements ZeRO reduces at a time, the size of its fp32 bucket: of the order of Megatron-LM's (40M). DeepSpeed's
# default, 5e8, is a 2 GB bucket, which stage 1 holds through the step for a model of fewer parameters per rank.
REDUCE_BUCKET_ELEMENTS = 50_000_000


class _ModelParallelUnit:
    """Our groups in the shape DeepSpeed's `mpu` argument expects (Megatron's names)."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.ctx.dp_cp_group

    def get_data_parallel_world_size(self) -> int:
        return group_size(self.ctx.dp_cp_group)

    def get_data_parallel_rank(self) -> int:
        return group_rank(self.ctx.dp_cp_group)

    def get_model_parallel_group(self) -> ProcessGroup:
        return self.ctx.tp_group

    def get_model_parallel_world_size(self) -> int:
        return group_size(self.ctx.tp_group)

    def get_model_parallel_rank(self) -> int:
        return group_rank(self.ctx.tp_group)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def _skip_cpu_shared_memory_compile() -> None:
    """On the CPU accelerator DeepSpeed's communication backend JIT-compiles a C++ shared-memory
    all-reduce (about 45 s, needs a compiler) that only its inference path calls; ZeRO reduces through
    torch.distributed (gloo). Marking the op unavailable skips the compile. No effect on GPUs."""
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class _CallersAutocast(nn.Module):
    """The module DeepSpeed wraps: runs the model under the autocast its caller entered. On CUDA,
    DeepSpeed's forward switches an outer autocast off unless its own `torch_autocast` is configured,
    which wants the precision up front and by default reduces nn.Linear weights' gradients in bf16."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.autocast: ContextManager = contextlib.nullcontext()

    def forward(self, *args, **kwargs) -> Tensor:
        with self.autocast:
            return self.model(*args, **kwargs)


def _sum_over_tp_hook(group: ProcessGroup) -> Callable[[Tensor], Tensor]:
    """A gradient hook returning the gradient summed over the group. Left as it is while a CUDA-graph capture runs the
    hook (autograd.grad calls a leaf's hooks): the graph's replay hands its gradient to this hook again, which sums it
    then; summed in the graph too, it would be summed twice."""
    return lambda grad: grad if handed_over() else all_reduce(grad.clone(), group)


def deal_by_size(sizes: list[int], owners: int) -> list[int]:
    """An owner in range(owners) for each item of `sizes`, in turn to the owner with the least so far: no owner ends
    more than the largest item above another (dealt in turn, the first owner of a model keeps its embedding and as
    many items as the rest)."""
    kept, dealt = [0] * owners, []
    for size in sizes:
        owner = kept.index(min(kept))
        kept[owner] += size
        dealt.append(owner)
    return dealt


class DeepSpeedEngine:
    """DeepSpeed ZeRO stage 1 or 2 over the DP x CP group, our AdamW inside."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, param_groups: list[dict], lr: float,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, zero_stage: int = 1, accumulation_steps: int = 1,
                 graphed: bool = False):
        """graphed: the model's blocks run as CUDA graphs (DeepSpeed is then built on their stream:
        graph_stream.engine_stream)."""
        if zero_stage not in (1, 2):
            raise ValueError(f"parallel.zero_stage = {zero_stage}: the DeepSpeed engine supports 1 and 2. Stage 3 would "
                             "shard parameters that tensor parallelism already holds sharded; use 2, or raise parallel.tp")
        if ctx.dp_cp_group is None or ctx.tp_group is None:
            raise ValueError("the DeepSpeed engine needs torch.distributed and the process groups of parallel.init_parallel(), "
                             "also for one process; without them use parallel.engine = \"ddp\"")
        # DeepSpeed drops empty groups from the optimizer; the rest map one to one onto its flat partitions.
        self.groups = [list(group["params"]) for group in param_groups if group["params"]]
        self.params = [p for group in self.groups for p in group]  # in the order of state_dict()'s indices, as DDPEngine's
        self.dp_cp_group = ctx.dp_cp_group
        self.optimizer = make_adamw(param_groups, lr, betas, eps)
        for p, role in zip(self.params, roles_of(model, self.params)):
            p.tensor_model_parallel = role.tp_dim is not None  # DeepSpeed's own mark, from the declared role
            if ctx.sequence_parallel and role.sequence_parallel:
                # Each TP rank holds part of this replicated parameter's gradient: sum it over TP as it
                # arrives, before DeepSpeed reduces it over DP x CP (stage 2 does so during backward).
                p.register_hook(_sum_over_tp_hook(ctx.tp_group))
        _skip_cpu_shared_memory_compile()
        config = {
            # Its throughput timer synchronizes the device at each micro batch and step: the trainer measures throughput.
            "timers": {"throughput": {"enabled": False}},
            # For DeepSpeed's sample counts only: the trainer batches, micro_step() marks the boundary.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": accumulation_steps,
            # Each rank's loss is already divided by the global token count: sum gradients, do not average.
            "gradient_allreduce_op": "sum",
            "zero_optimization": {"stage": zero_stage, "reduce_bucket_size": REDUCE_BUCKET_ELEMENTS},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, which ZeRO steps on its flat fp32 partitions
        }
        self.wrapper = _CallersAutocast(model)
        with engine_stream(graphed, self.params[0].device):
            self.ds, *_ = deepspeed.initialize(model=self.wrapper, optimizer=self.optimizer, config=config, mpu=_ModelParallelUnit(ctx))
        self.zero = self.ds.optimizer
        self.zero.clip_grad = 0.0  # our AdamW clips, with the norm ZeRO computes (_norm_to_adamw)
        self.weights_to_read = False  # ZeRO copied the model's weights when it was built

    def __call__(self, *args, **kwargs) -> Tensor:
        device = self.params[0].device.type
        self.wrapper.autocast = torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device))
        with torch.autocast(device, enabled=False):  # as DeepSpeed would on CUDA (with a warning), on every device
            return self.ds(*args, **kwargs)

    def micro_step(self, is_last: bool) -> ContextManager:
        """Stage 1 reduces gradients in the last micro batch's backward only; stage 2 reduce-scatters
        every micro batch's into its gradient shards, as ZeRO-2 must to keep just a shard."""
        self.ds.set_gradient_accumulation_boundary(is_last)
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole step

    def step(self, lr: float, max_norm: float) -> Tensor:
        """Clip and update when the gradient is finite (else skip); zero the gradients. Returns its norm, unread."""
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("step() must follow the backward of a micro_step(is_last=True)")
        if self.weights_to_read:
            self.zero.refresh_fp32_params()
            self.weights_to_read = False
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Skipped unless ZeRO hands over its norm (_norm_to_adamw), never clipped with an earlier step's.
        self.optimizer.grad_scale, self.optimizer.found_inf = None, torch.ones((), device=self.params[0].device)
        with self._norm_to_adamw(max_norm) as norms:
            self.ds.step()
        if len(norms) != 1:
            raise RuntimeError(f"DeepSpeed {deepspeed.__version__}'s ZeRO step checked its gradient norm {len(norms)} times, "
                               "not once: megassm needs deepspeed 0.19.8 (pip install 'megassm[deepspeed]')")
        return norms[0]

    @contextlib.contextmanager
    def _norm_to_adamw(self, max_norm: float) -> Iterator[list[Tensor]]:
        """While ZeRO steps, the global norm it computes goes to our AdamW, which clips with it and skips the update where
        it is not finite, decided on the device (data_parallel.clip_on_device, the DDP engine's rule); ZeRO is told the
        norm is finite. Two of ZeRO's helpers would make the host wait for every step's backward before queueing the
        next step, and are replaced for the step: `is_invalid_grad_norm` reads the norm on the host (bool of a tensor),
        `mask_nan_or_inf_with_val_inplace` copies its -1 from the host and reads it back (masked_fill_ with a tensor
        value): synchronous copies. Yields the norms seen."""
        norms, host_check, host_mask = [], stage_1_and_2.is_invalid_grad_norm, stage_1_and_2.mask_nan_or_inf_with_val_inplace

        def decided_on_device(norm: Tensor | float) -> bool:
            if not torch.is_tensor(norm):
                return host_check(norm)
            norm = torch.where(norm < 0, torch.inf, norm)  # invalid as the check has it: not finite, or ZeRO's mark -1
            clip_on_device(self.optimizer, norm, max_norm)
            norms.append(norm)
            return False

        def masked_on_device(norm: Tensor, device: object = None, val: float = -1.0) -> None:
            norm.masked_fill_(~torch.isfinite(norm), val)

        stage_1_and_2.is_invalid_grad_norm, stage_1_and_2.mask_nan_or_inf_with_val_inplace = decided_on_device, masked_on_device
        try:
            yield norms
        finally:
            stage_1_and_2.is_invalid_grad_norm, stage_1_and_2.mask_nan_or_inf_with_val_inplace = host_check, host_mask

    def weights_loaded(self) -> None:
        """ZeRO keeps its own fp32 copy of the weights and overwrites the model's with it after each update: the model's
        are read into it at the next step (exact in fp32). Not at every step: a copy of every weight, 2 ms at 780m."""
        self.weights_to_read = True

    def _partition_states(self) -> Iterator[tuple[list[nn.Parameter], Tensor, dict]]:
        """Each parameter group, its flat fp32 partition on this rank and that partition's AdamW state,
        each parameter linked to its part of the state. DeepSpeed 0.19.8 links them itself after its
        first update of group 0, before the other groups have any state, and never again."""
        for params, flat in zip(self.groups, self.zero.single_partition_of_fp32_groups):
            flat_state = self.optimizer.state.get(flat, {})
            if flat_state:
                lazy_init_hp_params_optimizer_state(params, flat, self.optimizer.state)
            yield params, flat, flat_state

    def state_dict(self) -> dict:
        """AdamW's state in torch's own format: per parameter (this TP rank's piece), assembled over DP x CP (a
        collective: every rank calls it; DeepSpeed's get_full_hp_param all-reduces each whole tensor, one at a time)
        and kept by one rank of DP x CP, the parameter's owner: the owners are dealt the parameters by size, so that
        each keeps about its share of the state. A checkpoint, which merges the ranks' entries, is the same as the DDP
        engine's and loads at any DP size."""
        state, groups, indices = {}, [], itertools.count()
        owners = deal_by_size([p.numel() for p in self.params], group_size(self.dp_cp_group))
        mine = group_rank(self.dp_cp_group)
        for group, (params, flat, flat_state) in zip(self.optimizer.param_groups, self._partition_states()):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [next(indices) for _ in params]})
            for index, p in zip(groups[-1]["params"], params):
                if flat_state:
                    entry = {key: safe_get_full_optimizer_state(p, key) if value.shape == flat.shape else value.clone()
                             for key, value in flat_state.items()}
                    if owners[index] == mine:
                        state[index] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Load a state_dict() of either engine: the hyperparameters, and into each parameter's part of
        this rank's partition its state."""
        saved_groups, saved_state = state["param_groups"], state["state"]
        if len(saved_groups) != len(self.groups):
            raise ValueError(f"the optimizer state has {len(saved_groups)} parameter groups, this model {len(self.groups)}: "
                             "was it saved with other weight-decay settings?")
        flat_state = {}  # torch loads it (dtypes, devices, where `step` lives); element-wise entries are filled below
        for g, (saved, (params, flat, _)) in enumerate(zip(saved_groups, self._partition_states())):
            if saved["params"] and saved["params"][0] in saved_state:
                first = saved_state[saved["params"][0]]
                flat_state[g] = {key: torch.zeros_like(flat) if value.shape == params[0].shape else value.clone()
                                 for key, value in first.items()}
        param_groups = [{**saved, "params": [g]} for g, saved in enumerate(saved_groups)]
        load_adamw_state(self.optimizer, {"state": flat_state, "param_groups": param_groups})
        for g, (saved, (params, _, _)) in enumerate(zip(saved_groups, self._partition_states())):
            if g in flat_state:  # _partition_states() linked the parameters to the state torch just loaded
                for p, index in zip(params, saved["params"]):
                    for key, value in saved_state[index].items():
                        if value.shape == p.shape:
                            safe_set_full_optimizer_state(p, value, key)

"""What the trainer decides for itself from the config and the device, and the limits it checks before building
anything: CUDA graphs ("auto"), the blocks activation checkpointing recomputes ("auto"), keeping the SSD's states
("auto"), the graphs' groups of layers on several replicas, the Triton kernels' limits (32-bit addressing, head dimension, norm
group width), and what to change after running out of GPU memory."""

from __future__ import annotations

import dataclasses
import math

import torch

from megassm.config import Config, ConfigError, cuda_graph_blockers
from megassm.metrics import logical_param_count
from megassm.model.config import MLP_SEGMENTS
from megassm.ops import TRITON_MAX_ELEMENTS
from parallel import ParallelContext
from parallel.context import group_size


def out_of_memory_advice(cfg: Config, step: int, keep_ssd_states: bool, cuda_graphs: bool, recomputed_blocks: int) -> str:
    """What to change when training step `step` (0-based) ran out of memory: the cheapest levers first."""
    tokens = cfg.micro_batch_tokens
    levers = []
    if cfg.data.micro_batch > 1:
        levers.append(f"lower data.micro_batch (now {cfg.data.micro_batch}; gradient accumulation keeps data.global_batch)")
    if keep_ssd_states:
        states = ssd_states_bytes(cfg, recomputed_blocks)
        levers.append(f"set train.keep_ssd_states = false (the SSD's states take {states / 2**30:.1f} GiB)")
    if cuda_graphs:
        levers.append("set train.cuda_graphs = false (their memory pool)")
    if recomputed_blocks == 0:
        levers.append("set train.activation_checkpointing = true")
    elif recomputed_blocks < cfg.model.n_layer:
        levers.append(f"recompute more blocks: train.activation_checkpointing = true (all {cfg.model.n_layer}) or a number "
                      f"above {recomputed_blocks}")
    levers.append("spread the sequence or the model over more GPUs (parallel.cp, parallel.tp)")
    return f"the GPU ran out of memory in step {step + 1} ({tokens:,} tokens per micro batch and rank): " + "; or ".join(levers)


# megassm's SSD kernels hold (64, headdim) tiles per program: compiled for sm_90, past 256 (padded to 512) no configuration
# of the output and head-gradient kernels fits an SM's shared memory or registers; past 64 they spill registers.
SSD_MAX_HEADDIM = 256
# mamba-ssm's gated-norm forward holds a row's channels of one norm group in a block of at most 64 KB.
NORM_MAX_GROUP_BYTES = 65536


def check_kernel_limits(cfg: Config, backend: str) -> None:
    """What the Triton kernels cannot run, refused before anything is built rather than met at the first step."""
    if backend != "triton":
        return
    tokens = cfg.micro_batch_tokens
    width = cfg.model.in_proj_width // cfg.parallel.tp
    if tokens * width >= TRITON_MAX_ELEMENTS:  # 32-bit offsets: out-of-bounds reads and writes past 2^31 elements
        fits = (TRITON_MAX_ELEMENTS - 1) // width
        raise ConfigError(f"data.micro_batch * data.seq_len / parallel.cp = {tokens:,} tokens per micro batch and rank, times in_proj's "
                          f"{width:,} channels per rank, exceed the 2^31 elements the Triton kernels can address: at most {fits:,} tokens "
                          "fit; lower data.micro_batch or data.seq_len, or raise parallel.cp")
    if "M" not in cfg.model.layer_kinds:  # no Mamba-2 block: no SSD, no gated norm
        return
    if cfg.kernels.ssd == "megassm" and cfg.model.headdim > SSD_MAX_HEADDIM:
        raise ConfigError(f"model.headdim = {cfg.model.headdim}: megassm's SSD kernels take head dimensions up to {SSD_MAX_HEADDIM} "
                          "(up to 64 without register spills); lower model.headdim")
    group = cfg.model.d_inner // cfg.model.ngroups
    most = NORM_MAX_GROUP_BYTES // compute_bytes(cfg)
    if group > most:
        raise ConfigError(f"model.d_inner / model.ngroups = {group:,} channels per norm group: the gated norm's kernel takes at most "
                          f"{most:,} in {cfg.train.precision}; raise model.ngroups")


def check_weights_fit(cfg: Config, host_memory_share: int | None) -> None:
    """ConfigError where a rank's fp32 weights alone exceed the host memory left to each process (host_memory.available()
    over the node's processes, the smallest over the job's nodes; None: unknown): each builds its model there before
    moving it to its GPU, and past that the allocator's traceback or the kernel's OOM killer would say it."""
    params = logical_param_count(cfg.model)
    weights = 4 * params // cfg.parallel.tp
    if host_memory_share is not None and weights > host_memory_share:
        raise ConfigError(f"the model's {params / 1e9:.2f}B parameters take {weights / 2**30:.1f} GiB of fp32 "
                          f"weights per rank (parallel.tp = {cfg.parallel.tp}), more than the {host_memory_share / 2**30:.1f} GiB of host "
                          "memory left to each process (on the fullest node): check the [model] sizes, or raise parallel.tp")


# "auto" graphs micro batches of up to this many tokens per rank: a 780m step of 8 x 2048 tokens spends 30%
# of its time launching kernels without graphs, one of 65,536 tokens none, and its graphs' memory pool, which
# the rest of the step cannot use, runs an H200 out of memory where the same step without graphs fits.
GRAPHS_AUTO_MAX_TOKENS = 32768


def cuda_graphs_choice(cfg: Config, device: torch.device) -> tuple[bool, str]:
    """Whether the blocks run as CUDA graphs, and the start-up line's words for it. "auto" takes them
    where they are correct and save launch time, with activation checkpointing too: on an H200 its 780m step of
    8 x 2048 tokens ran 1.34x as fast with them, in no more memory (bench/RESULTS.md)."""
    choice, blockers = cfg.train.cuda_graphs, cuda_graph_blockers(cfg)
    if device.type != "cuda" or choice is False:
        return False, "no CUDA graphs"
    if blockers:  # only "auto" gets here: validation refuses true
        return False, f"no CUDA graphs (they need {' and '.join(blockers)})"
    tokens = cfg.micro_batch_tokens
    if choice == "auto" and tokens > GRAPHS_AUTO_MAX_TOKENS:
        return False, f"no CUDA graphs ({tokens:,} tokens per micro batch launch few kernels per token; train.cuda_graphs = true adds them)"
    return True, "CUDA graphs"


# "auto" recomputes the first blocks, as few as bring training_memory_estimate within this share of the GPU's memory.
# Steps measured at up to 96% of it ran (bench/RESULTS.md: 780m at 1 x 32,768 tokens on an H100, at 1 x 65,536 on an
# H200), the estimate within 1.5% below them; each block recomputed costs about a third of its time again.
RECOMPUTE_ABOVE_SHARE = 0.95
# "auto" keeps the SSD's states when those of the layers not recomputed take at most this share of the GPU's memory,
# and with the rest of the step (training_memory_estimate) at most STEP_MEMORY_MAX_SHARE of it: they save a few
# percent of a step, so only with room to spare. On an H200 (bench/RESULTS.md): 780m at 8 x 2048 tokens keeps 9.7 GB,
# 2% faster; at 1 x 32,768 19.3 GB (90 GiB peak), 5% faster; at 1 x 65,536 the 39 GB would not fit next to the rest
# (134 GiB without them). On an 80 GB H100, 2.7b at 2 x 4096 tokens ran out of memory with its 10.7 GB (more than
# 40 GB of weights, gradients and AdamW's moments besides).
KEEP_SSD_STATES_AUTO_SHARE = 0.2
# On an H100 the estimate came out 1-7% above the memory the steps took at 780m 8 x 2048, 1.3b 4 x 4096 and 2.7b
# 2 x 4096, within 1.5% at 780m 1 x 32,768 to 131,072 (bench/RESULTS.md runs 32-33).
STEP_MEMORY_MAX_SHARE = 0.9
# Set aside on each GPU of a job of several processes, which the estimate does not count (the measurements above are of
# one process): NCCL's buffers, a few hundred MB per communicator (4 MiB per channel and peer, NCCL_BUFFSIZE) for
# the job's TP, CP, DP and world communicators. Not measured here.
COMMUNICATION_ALLOWANCE = 2 * 2**30


def replicas(cfg: Config) -> int:
    """The ranks of DP x CP, each holding the same weights (the config as load_config resolved it for its world size)."""
    if cfg.parallel.dp < 1:
        raise ValueError(f"parallel.dp = {cfg.parallel.dp}: the memory choices need the config resolved for its world size")
    return cfg.parallel.dp * cfg.parallel.cp


def usable_memory(cfg: Config, device_memory: int) -> int:
    """What the memory choices share out of a GPU of `device_memory` bytes: all of it for one process, less
    COMMUNICATION_ALLOWANCE for several."""
    return device_memory - (COMMUNICATION_ALLOWANCE if replicas(cfg) * cfg.parallel.tp > 1 else 0)


def _gpu_words(cfg: Config, device_memory: int) -> str:
    """The start-up line's words for the memory the choices share out."""
    set_aside = device_memory - usable_memory(cfg, device_memory)
    return f"the GPU's {device_memory / 2**30:.0f} GiB" + (f", {set_aside / 2**30:.0f} set aside for NCCL" if set_aside else "")


def _can_keep_ssd_states(cfg: Config, backend: str) -> bool:
    """Whether the SSD can keep its states at all: megassm's, in its fused mixer on the Triton backend."""
    return backend == "triton" and cfg.kernels.ssd == "megassm"


def ssd_states_bytes(cfg: Config, recomputed_blocks: int = 0) -> int:
    """What megassm's SSD states take when every Mamba-2 layer after the first `recomputed_blocks` blocks keeps them
    (a recomputed layer holds its own only during its backward): their shape per layer and rank, in the compute dtype,
    at its kernels' chunk."""
    from megassm.ops.ssd_triton import DEFAULT_KERNEL_CHUNK  # imports triton: only where the Triton backend runs
    from megassm.ops.ssd_triton_fwd import states_shape

    layout = cfg.model.mamba_layout(cfg.parallel.tp)
    shape = states_shape(cfg.data.micro_batch, cfg.data.seq_len // cfg.parallel.cp, layout.nheads, layout.headdim, layout.d_state,
                         DEFAULT_KERNEL_CHUNK)
    layers = cfg.model.layer_kinds[recomputed_blocks:].count("M")
    return layers * math.prod(shape) * compute_bytes(cfg)


def compute_bytes(cfg: Config) -> int:
    """Bytes of an element in the dtype the blocks compute in (bf16 under autocast)."""
    return 2 if cfg.train.precision == "bf16" else 4


def _kept_per_token(cfg: Config, kind: str) -> int:
    """Elements in the compute dtype one token's pass through a block of `kind` keeps for its backward on a rank: its
    normed input and its matmuls' outputs (Mamba-2: in_proj's, the conv's, the SSD's, the gated norm's; MLP: the up
    projection's, whose halves stay alive as one tensor, and the activation's; attention: the q/k/v projection's, the
    rotated q and k, the attention's output and o_proj's copy of it, and under CP the other ranks' k and v)."""
    model, tp = cfg.model, cfg.parallel.tp
    if kind == "M":
        layout = model.mamba_layout(tp)
        return model.d_model + layout.in_proj_width + layout.conv_channels + 2 * layout.d_inner
    if kind == "-":
        return model.d_model + 2 * len(MLP_SEGMENTS[model.mlp_activation]) * model.mlp_hidden // tp
    if kind != "*":
        raise ValueError(f"no memory estimate for blocks of kind {kind!r}")
    replicated = model.attn_kv_heads < tp  # every rank projects all key/value heads, then keeps one
    q = model.attn_heads * model.attn_head_dim // tp
    kv = model.attn_head_dim * (1 if replicated else model.attn_kv_heads // tp)
    projected = model.attn_head_dim * (model.attn_kv_heads if replicated else model.attn_kv_heads // tp)
    return model.d_model + q + 2 * projected + (q + kv if model.rope else 0) + 2 * q + 2 * kv * (cfg.parallel.cp - 1)


def block_bytes_per_token(cfg: Config) -> list[int]:
    """What one token's pass through each block keeps for its backward on a rank, without activation checkpointing:
    _kept_per_token in the compute dtype (the SSD's states apart: ssd_states_bytes; the block's fp32 input apart, which
    a recomputed block keeps too)."""
    return [compute_bytes(cfg) * _kept_per_token(cfg, kind) for kind in cfg.model.layer_kinds]


def state_bytes_per_parameter(cfg: Config, cuda_graphs: bool = False) -> float:
    """What a rank holds for each of its parameters through a training step's backward: the fp32 weight, and under DDP
    its gradient, AdamW's two moments, DDP's copy of the gradient in its buckets (more than one replica) and the CUDA
    graphs' gradient buffer next to `.grad` (several micro batches); under ZeRO its fp32 copy of the weight, the
    gradient and the moments, each split over the replicas of DP x CP, and with stage 1 the whole gradient, which it
    sums over micro batches before it reduces (counted in CPU processes, tests/test_deepspeed.py), and the graphs'
    gradient buffer, which ZeRO copies from."""
    copies = replicas(cfg)
    if cfg.parallel.engine == "deepspeed":
        whole_gradient = cfg.parallel.zero_stage == 1 and cfg.accumulation_steps > 1
        return 4 + 16 / copies + (4 - 4 / copies) * whole_gradient + 4 * cuda_graphs
    return 16 + 4 * (copies > 1) + 4 * (cuda_graphs and cfg.accumulation_steps > 1)


def engine_buffer_bytes(cfg: Config) -> int:
    """What the data-parallel engine holds beside the parameters' state: ZeRO's gradient bucket, in the backward (not
    counted by the test of state_bytes_per_parameter, which counts between backwards)."""
    if cfg.parallel.engine != "deepspeed":
        return 0  # DDP's buckets: in state_bytes_per_parameter
    from parallel.deepspeed_engine import REDUCE_BUCKET_ELEMENTS  # imports deepspeed: only where it runs

    return 4 * REDUCE_BUCKET_ELEMENTS


def training_memory_estimate(cfg: Config, cuda_graphs: bool = False, recomputed_blocks: int = 0) -> int:
    """Roughly the bytes a rank holds at the peak of a training step, the SSD's states apart: state_bytes_per_parameter
    for each parameter, engine_buffer_bytes, each block's fp32 input, and the larger of two peaks: at the end of the
    forward, what the blocks after the first `recomputed_blocks` keep for their backward and one block's worth of the
    backward's own tensors beside them; in a recomputed block's backward, its recomputed tensors and its backward's."""
    params = logical_param_count(cfg.model) // cfg.parallel.tp
    kept = block_bytes_per_token(cfg)
    activations = max(sum(kept[recomputed_blocks:]) + max(kept), 2 * max(kept[:recomputed_blocks], default=0))
    return (int(params * state_bytes_per_parameter(cfg, cuda_graphs)) + engine_buffer_bytes(cfg)
            + cfg.micro_batch_tokens * (4 * cfg.model.d_model * cfg.model.n_layer + activations))


def recomputed_blocks_choice(cfg: Config, backend: str, device_memory: int, cuda_graphs: bool = False) -> tuple[int, str]:
    """How many blocks, the first ones, activation checkpointing recomputes (train.activation_checkpointing; device_memory
    in bytes, 0 without a GPU; cuda_graphs as training_memory_estimate takes it; the SSD's states counted where
    train.keep_ssd_states = true keeps them), and the start-up line's words for it. Why the first ones:
    apply_activation_checkpointing."""
    choice, blocks = cfg.train.activation_checkpointing, cfg.model.n_layer
    if choice != "auto":
        recomputed = blocks if choice is True else int(choice)
        return recomputed, _recomputed_words(recomputed, blocks)
    if not device_memory:
        return 0, _recomputed_words(0, blocks)
    if backend != "triton":
        return 0, (f"{_recomputed_words(0, blocks)} (\"auto\" knows the memory of the Triton kernels only; "
                   "train.activation_checkpointing = true recomputes every block)")
    limit = RECOMPUTE_ABOVE_SHARE * usable_memory(cfg, device_memory)
    states_kept = cfg.train.keep_ssd_states is True and _can_keep_ssd_states(cfg, backend)
    need = [training_memory_estimate(cfg, cuda_graphs, k) + (ssd_states_bytes(cfg, k) if states_kept else 0) for k in range(blocks + 1)]
    recomputed = next((k for k, bytes_ in enumerate(need) if bytes_ <= limit), blocks)
    if recomputed == 0:
        return 0, _recomputed_words(0, blocks)
    words = f"{_recomputed_words(recomputed, blocks)} (without: a step would take ~{need[0] / 2**30:.0f} of "
    words += _gpu_words(cfg, device_memory)
    if need[-1] <= limit:
        return recomputed, words + ")"
    levers = "raise parallel.cp or parallel.tp"
    levers = f"lower data.micro_batch, or {levers}" if cfg.data.micro_batch > 1 else levers
    return recomputed, words + f"; with every block recomputed still ~{need[-1] / 2**30:.0f}: {levers})"


def _recomputed_words(recomputed: int, blocks: int) -> str:
    """The start-up line's words for `recomputed` of `blocks` blocks, the first ones, recomputed."""
    if recomputed == 0:
        return "no activation checkpointing"
    if recomputed == blocks:
        return "activation checkpointing"
    return f"activation checkpointing of block{'s 1-' if recomputed > 1 else ' '}{recomputed} of {blocks}"


def keep_ssd_states_choice(cfg: Config, backend: str, device_memory: int, cuda_graphs: bool = False,
                           recomputed_blocks: int = 0) -> tuple[bool, str]:
    """Whether megassm's SSD keeps its per-chunk states for the backward (train.keep_ssd_states; device_memory in
    bytes; cuda_graphs and recomputed_blocks as training_memory_estimate takes them), and the start-up line's words for
    it where its SSD runs. Only its fused mixer (Triton backend, megassm's SSD kernels) can."""
    choice = cfg.train.keep_ssd_states
    if not _can_keep_ssd_states(cfg, backend):
        return False, ""
    if choice is False:
        return False, "states recomputed"
    if choice is True or recomputed_blocks == cfg.model.n_layer:  # every layer holds its states only during its backward
        return True, "states kept"
    states = ssd_states_bytes(cfg, recomputed_blocks)
    rest = training_memory_estimate(cfg, cuda_graphs, recomputed_blocks)
    usable = usable_memory(cfg, device_memory)
    if states <= KEEP_SSD_STATES_AUTO_SHARE * usable and states + rest <= STEP_MEMORY_MAX_SHARE * usable:
        return True, "states kept"
    return False, (f"states recomputed: with them a step would take ~{(states + rest) / 2**30:.0f} of {_gpu_words(cfg, device_memory)}; "
                   "train.keep_ssd_states = true keeps them")


@dataclasses.dataclass(frozen=True)
class MemoryChoices:
    """The trainer's memory levers for a run: the blocks recomputed, the SSD's states kept, and the words for each."""

    recomputed_blocks: int
    keep_ssd_states: bool
    recompute_note: str
    states_note: str


def memory_choices(cfg: Config, backend: str, device_memory: int, cuda_graphs: bool = False) -> MemoryChoices:
    """The levers by their cost: as few blocks recomputed as the step needs, then the states kept where room is left."""
    recomputed, recompute_note = recomputed_blocks_choice(cfg, backend, device_memory, cuda_graphs)
    keep, states_note = keep_ssd_states_choice(cfg, backend, device_memory, cuda_graphs, recomputed)
    return MemoryChoices(recomputed, keep, recompute_note, states_note)


# On several replicas the blocks' CUDA graphs come in this many groups of layers, so that DDP (or ZeRO-2, not measured
# on several GPUs) sums each group's gradients over the ranks while the earlier groups' backward runs: left after the
# backward are the first group's sums and the embedding's (at 780m ~22% of the gradients), not all of them (~3 GB).
# Between groups nothing is copied (megassm/model/cuda_graphs.py), but each boundary's tensors stay in the graphs' pool:
# ZeRO-1, which reduces after the backward, gets one group.
CUDA_GRAPH_GROUPS_OVER_REPLICAS = 8


def cuda_graph_groups(ctx: ParallelContext, engine: str = "ddp", zero_stage: int = 1) -> int:
    """How many groups of layers the blocks' CUDA graphs come in: several where the engine (parallel.engine, with
    parallel.zero_stage) sums gradients over ranks during the backward."""
    sums_in_backward = engine == "ddp" or zero_stage > 1
    return CUDA_GRAPH_GROUPS_OVER_REPLICAS if sums_in_backward and group_size(ctx.dp_cp_group) > 1 else 1

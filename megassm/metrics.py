"""Training metrics: model FLOPs and MFU, memory, step timing, and the run's log (metrics.jsonl,
console, optionally Weights & Biases).

MFU counts model FLOPs: tokens/s x (6 x params + 3 x (SSD + attention) forward FLOPs per token) / peak. The 6 x
params term covers every matmul with a weight (forward 2, backward 4 FLOPs per parameter and token), as Megatron-LM's
and mamba-ssm's benchmarks count it; the SSD scan and attention's scores have no weights, so their forward FLOPs are
counted from the algorithm and tripled: attention's causal half as Megatron-LM does, the SSD's chunked algorithm
(Megatron-LM's 7 x d_inner x d_state per token is 0.1-1.1% more of a preset's total, so its MFU reads that much
higher for the same speed).
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from megassm.model.config import MLP_SEGMENTS, ModelConfig

GIB = 2**30
METRICS_FILE = "metrics.jsonl"  # in run.dir: one JSON record per logged step
WANDB_ID_FILE = "wandb_id"  # in run.dir: the W&B run its log's history goes on in


def logical_param_count(cfg: ModelConfig) -> int:
    """Parameters of the whole (unsharded) model, as Mamba2LM builds it."""
    blocks = sum(BLOCK_PARAMS[kind](cfg) + cfg.d_model for kind in cfg.layer_kinds)  # + each block's norm
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return embeddings + blocks + cfg.d_model  # + final norm


def mamba_params(cfg: ModelConfig) -> int:
    layout = cfg.mamba_layout()
    in_proj = layout.in_proj_width * (cfg.d_model + cfg.proj_bias)
    conv = layout.conv_channels * (cfg.d_conv + cfg.conv_bias)
    out_proj = cfg.d_model * (layout.d_inner + cfg.proj_bias)
    heads = 3 * layout.nheads  # dt_bias, A_log, D
    return in_proj + conv + heads + layout.d_inner + out_proj  # + gated norm


def attention_params(cfg: ModelConfig) -> int:
    qkv = (cfg.attn_heads + 2 * cfg.attn_kv_heads) * cfg.attn_head_dim * cfg.d_model
    return qkv + cfg.d_model * cfg.attn_heads * cfg.attn_head_dim  # + o_proj


def mlp_params(cfg: ModelConfig) -> int:
    return (len(MLP_SEGMENTS[cfg.mlp_activation]) + 1) * cfg.mlp_hidden * cfg.d_model  # up_proj's segments, down_proj


BLOCK_PARAMS = {"M": mamba_params, "*": attention_params, "-": mlp_params}


def ssd_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the SSD scan of all Mamba-2 blocks, as the chunked algorithm computes it
    (megassm/ops/ssd.py, mamba-ssm's kernels); a multiply-add is 2 FLOPs, elementwise work is not counted.

    With Q = min(chunk_size, seq_len), H heads of P channels, G groups, state size N, per chunk:
      intra-chunk scores C_i . B_j  over the causal pairs j <= i, per group:   Q(Q+1)/2 x G N
      scores x x_j over the same pairs, per head:                             Q(Q+1)/2 x H P
      the chunk's own final state, sum_j B_j x_j^T:                           Q x H P N
      state passing, one decayed add of that state per chunk (a scan):        H P N
      the entering state's contribution to each output, C_i . state:          Q x H P N
    The last chunk is padded to Q tokens, as the kernels compute it.
    """
    layout = cfg.mamba_layout()
    q = min(cfg.chunk_size, seq_len)
    chunks = math.ceil(seq_len / q)
    hpn = layout.d_inner * layout.d_state
    macs_per_chunk = q * (q + 1) // 2 * (layout.ngroups * layout.d_state + layout.d_inner) + (2 * q + 1) * hpn
    return 2 * macs_per_chunk * chunks * cfg.layer_kinds.count("M") / seq_len


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of all attention blocks' scores q k^T and their product with v, as Megatron-LM's
    hybrid count takes them: each of the two matmuls 2 x attn_heads x attn_head_dim FLOPs per (query, key) pair,
    over the causal half of the seq_len x seq_len pairs (seq_len / 2 keys per query), whatever the documents."""
    return cfg.layer_kinds.count("*") * 2 * 2 * cfg.attn_heads * cfg.attn_head_dim * seq_len / 2


def model_flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training (forward + backward) FLOPs per token: 6 x the parameters of matmuls + 3 x the SSD's and attention's
    forward FLOPs. n_params is the logical whole-model count (logical_param_count), not one rank's shard; an untied
    input embedding is a lookup, not a matmul."""
    matmul_params = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    return 6 * matmul_params + 3 * (ssd_flops_per_token(cfg, seq_len) + attention_flops_per_token(cfg, seq_len))


# Dense bf16 tensor-core peaks, FLOP/s; the first entry whose words all occur in the device's name wins (words, so
# that a GB200 is not taken for a B200 nor a GH200 for an H200).
PEAK_BF16 = (
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM (HBM3)
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("B200",), 2250e12),
    (("GB200",), 2500e12),
)


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: override_tflops (the config's train.peak_tflops) if given, else the
    dense bf16 peak of a known GPU, else None (CPU, unknown GPU), for which MFU is reported as null."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    words = set(torch.cuda.get_device_name(device).upper().replace("-", " ").split())
    return next((peak for parts, peak in PEAK_BF16 if words.issuperset(parts)), None)


def memory_gib(device: torch.device) -> float:
    """Peak GiB reserved by PyTorch's allocator on a CUDA device since the last call (the peak is reset after
    reading, so each log line reports its own interval): tensors, cached blocks and CUDA graphs' private pools,
    whose memory stays taken between replays but counts as allocated only while they capture. On CPU the
    process's maximum resident set size so far."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / GIB
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024) / GIB  # bytes on macOS, KiB on Linux


class Lap(NamedTuple):
    elapsed: float  # seconds of wall time in the interval
    data_fraction: float  # the part of it spent waiting for batches


class StepTimer:
    """Wall time of each logging interval spent training, and the part of it spent waiting for data. On CUDA, lap()
    synchronizes first, so queued kernels are counted in the interval that launched them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._start = time.perf_counter()
        self._data_s = self._excluded_s = 0.0

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Around work that is not training (validation, checkpoints): its time is left out of the interval."""
        self._synchronize()  # the training queued before is the interval's
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self._excluded_s += time.perf_counter() - start

    @contextmanager
    def data_wait(self) -> Iterator[None]:
        """Around fetching a batch: the time inside counts as waiting for data."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._data_s += time.perf_counter() - start

    def lap(self) -> Lap:
        """The interval since the previous lap (or construction), and start the next one."""
        self._synchronize()
        now = time.perf_counter()
        elapsed = now - self._start - self._excluded_s
        lap = Lap(elapsed, self._data_s / elapsed if elapsed > 0 else 0.0)
        self._start, self._data_s, self._excluded_s = now, 0.0, 0.0
        return lap


def throughput(tokens: int, seconds: float, world_size: int, flops_per_token: float, peak: float | None) -> dict[str, float | None]:
    """tokens_per_s of the whole job, tokens_per_s_per_gpu, and mfu (a fraction; None without a peak):
    every GPU of the job shares the work of every token, whatever the TP/CP/DP layout."""
    tokens_per_s = tokens / seconds
    mfu = tokens_per_s * flops_per_token / (world_size * peak) if peak else None
    return {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": tokens_per_s / world_size, "mfu": mfu}


# Console fields in order: key in the metrics dict, format. Absent or None values are skipped.
CONSOLE_FIELDS = (
    ("loss", "loss {:.3f}"),
    ("val_loss", "val_loss {:.3f}"),
    ("lr", "lr {:.1e}"),
    ("grad_norm", "grad {:.2f}"),
    ("tokens_per_s_per_gpu", "{:,.0f} tok/s/gpu"),
    ("mfu", "mfu {:.1%}"),
    ("mem_gib", "mem {:.1f} GiB"),
    ("data_fraction", "data {:.1%}"),
)


def console_line(metrics: dict, total_steps: int | None = None) -> str:
    """One line such as `step 120/500 | loss 3.412 | lr 2.1e-04 | ... | mem 21.3 GiB | data 0.3%`."""
    step = f"step {metrics['step']}" + (f"/{total_steps}" if total_steps else "")
    fields = (fmt.format(metrics[key]) for key, fmt in CONSOLE_FIELDS if metrics.get(key) is not None)
    return " | ".join((step, *fields))


def _json_safe(value):
    """NaN and infinities as null, so that every line stays valid JSON (a NaN loss is still visible: null)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _start_wandb(run_dir: Path, project: str, run_name: str, config: dict, continues: bool):
    """A wandb run; offline into run_dir/wandb when no API key and no WANDB_MODE are set. A run that `continues` the
    history of run_dir's log (resumed from one of its checkpoints) goes on in the W&B run of that history, whose id
    run_dir keeps (WANDB_ID_FILE); W&B drops the steps it already has, which a resume from an older checkpoint logs
    again. A run from scratch, or from a checkpoint elsewhere, starts a W&B run of its own."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if continues and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # W&B ids are lowercase letters and digits
        id_file.write_text(run_id + "\n")
    mode = None
    if "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ:
        mode = "offline"
        print(f"wandb: no WANDB_API_KEY or WANDB_MODE set, logging offline into {run_dir / 'wandb'} (upload with `wandb sync`)", flush=True)
    return wandb.init(project=project, name=run_name, config=config, dir=run_dir, mode=mode, id=run_id, resume="allow")


class MetricsLogger:
    """The run's log, created on every rank: only the writer (global rank 0) writes anything.
    Each log() appends one JSON object to run_dir/metrics.jsonl (flushed, so a crash loses nothing),
    prints one console line, and goes to wandb when enabled."""

    def __init__(self, run_dir: Path, is_writer: bool, wandb: bool, wandb_project: str, run_name: str,
                 config: dict, total_steps: int | None = None, continues: bool = False):
        self.is_writer, self.total_steps = is_writer, total_steps
        self._file = self._wandb = self._bar = None
        if not is_writer:
            return
        # A progress bar only on a terminal: in a log file the console lines say the same.
        self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=False, disable=not sys.stdout.isatty())
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")  # a resumed run appends
        if wandb:
            self._wandb = _start_wandb(run_dir, wandb_project, run_name, config, continues)

    def log(self, metrics: dict) -> None:
        """metrics must hold `step`; values are numbers (or None)."""
        if not self.is_writer:
            return
        record = {key: _json_safe(value) for key, value in metrics.items()}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        tqdm.write(console_line(metrics, self.total_steps))
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=metrics["step"])

    def progress(self, step: int) -> None:
        """Move the progress bar to `step` steps done."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def holds_records(run_dir: Path) -> bool:
    """Whether run_dir/metrics.jsonl logs any step."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(_record_step(line) != math.inf for line in f)


def drop_records_after(run_dir: Path, step: int) -> int:
    """Keep the records of run_dir/metrics.jsonl up to `step`, the step a run starts from: later ones belong to a
    history it does not continue (or it is about to log them again). Returns how many lines were dropped, lines
    that are not records (a write cut short) included."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) < len(lines):
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept), encoding="utf-8")
        temporary.replace(path)
    return len(lines) - len(kept)


def _record_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a record."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl by step; where a resumed run logged a step again, the last
    record wins. Raises ValueError with one line naming the file when it is missing, empty or not JSON lines."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                by_step[record["step"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}, line {number}: not a JSON object with a step") from None
    if not by_step:
        raise ValueError(f"{path}: no records")
    return [by_step[step] for step in sorted(by_step)]

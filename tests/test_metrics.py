"""Metrics: parameter and FLOP counts against the model and the reference SSD, the run log on the writer
rank only, wandb offline without a key, and the plot tool."""

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megassm.metrics import (
    MetricsLogger,
    attention_flops_per_token,
    StepTimer,
    console_line,
    logical_param_count,
    memory_gib,
    model_flops_per_token,
    peak_flops,
    read_metrics,
    ssd_flops_per_token,
    throughput,
)
from megassm.model import Mamba2LM, ModelConfig
from megassm.ops.attention import causal_document_attention
from megassm.ops.ssd import ssd_chunked

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig.from_preset("debug"),
        ModelConfig.from_preset("debug-g1"),
        ModelConfig.from_preset("debug", tie_embeddings=False, proj_bias=True),
        ModelConfig.from_preset("debug-g1", conv_bias=False, expand=3, d_conv=3),
        ModelConfig.from_preset("debug-hybrid"),
        ModelConfig.from_preset("debug-hybrid", mlp_activation="relu2", tie_embeddings=False),
    ],
    ids=["debug", "debug-g1", "untied-proj-bias", "no-conv-bias", "hybrid-swiglu", "hybrid-relu2-untied"],
)
def test_logical_param_count_matches_the_model(cfg):
    assert logical_param_count(cfg) == sum(p.numel() for p in Mamba2LM(cfg).parameters())


def test_hybrid_counts_by_hand():
    """Nemotron-H 8B's published size, and one attention and one MLP block counted by hand."""
    assert logical_param_count(ModelConfig.from_preset("nemotron-h-8b")) / 1e9 == pytest.approx(8.1, abs=0.05)
    cfg = ModelConfig(d_model=8, n_layer=2, vocab_size=10, pattern="*-", attn_heads=4, attn_kv_heads=2, attn_head_dim=6, mlp_hidden=5)
    qkv, o, mlp = (4 + 2 + 2) * 6 * 8, 8 * 4 * 6, 3 * 5 * 8  # swiglu: gate, up, down
    assert logical_param_count(cfg) == 10 * 8 + qkv + o + mlp + 3 * 8  # + 2 block norms and the final norm
    assert model_flops_per_token(cfg, 100, 7) == 6 * 7 + 3 * 2 * 2 * 4 * 6 * 50  # no SSD; the causal half of the scores


def test_attention_flops_are_the_causal_half_of_the_reference():
    """The reference computes q k^T and its product with v over every (query, key) pair; the count takes half."""
    cfg = ModelConfig(d_model=16, n_layer=1, vocab_size=32, pattern="*", attn_heads=4, attn_kv_heads=2, attn_head_dim=8)
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    with FlopCounterMode(display=False) as counter:
        causal_document_attention(q, k, k, None, None)
    assert 2 * attention_flops_per_token(cfg, 40) * 40 == counter.get_total_flops()


def reference_ssd_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Matmul FLOPs of one layer of megassm's reference ssd_chunked, as torch's flop counter sees them."""
    h, p, g, n = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
    x, B, C = torch.randn(1, seq_len, h, p), torch.randn(1, seq_len, g, n), torch.randn(1, seq_len, g, n)
    with FlopCounterMode(display=False) as counter:
        ssd_chunked(x, torch.rand(1, seq_len, h), -torch.rand(h), B, C, min(cfg.chunk_size, seq_len))
    return counter.get_total_flops()


@pytest.mark.parametrize("seq_len", [16, 40, 5], ids=["one-chunk", "padded-last-chunk", "shorter-than-chunk"])
def test_ssd_flops_match_the_reference_less_its_redundant_work(seq_len):
    """With one group per head the reference computes exactly the counted matmuls, plus the upper
    triangle of every chunk's (Q x Q) scores that the causal mask discards, and its state passing as a
    (chunks+1)^2 matmul over state slots where the count takes a scan of one update per chunk."""
    cfg = ModelConfig(d_model=16, n_layer=1, vocab_size=32, d_state=3, headdim=4, ngroups=8, chunk_size=16)
    q = min(cfg.chunk_size, seq_len)
    chunks = math.ceil(seq_len / q)
    h, p, n = cfg.nheads, cfg.headdim, cfg.d_state
    upper_triangles = 2 * chunks * q * (q - 1) // 2 * h * (n + p)
    quadratic_state_passing = 2 * ((chunks + 1) ** 2 - chunks) * h * p * n
    counted = ssd_flops_per_token(cfg, seq_len) * seq_len
    assert counted + upper_triangles + quadratic_state_passing == pytest.approx(reference_ssd_flops(cfg, seq_len))


def test_ssd_flops_scaling():
    cfg = ModelConfig.from_preset("mamba2-130m")
    seq_len = 4096
    flops = ssd_flops_per_token(cfg, seq_len)
    assert ssd_flops_per_token(dataclasses.replace(cfg, n_layer=48), seq_len) == pytest.approx(2 * flops)
    # Per token it depends on the chunk size only, not on how many chunks the sequence has ...
    assert ssd_flops_per_token(cfg, 2 * seq_len) == pytest.approx(flops)
    # ... as (Q+1)/2 (G N + H P) + 2 H P N + H P N / Q multiply-adds per layer.
    h, p, g, n = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
    for q in (64, 256):
        per_layer = 2 * ((q + 1) / 2 * (g * n + h * p) + 2 * h * p * n + h * p * n / q)
        assert ssd_flops_per_token(dataclasses.replace(cfg, chunk_size=q), seq_len) == pytest.approx(cfg.n_layer * per_layer)
    # A sequence shorter than a chunk is one chunk of its own length.
    assert ssd_flops_per_token(cfg, 100) == pytest.approx(ssd_flops_per_token(dataclasses.replace(cfg, chunk_size=100), 100))


def test_model_flops_per_token_and_throughput():
    cfg = ModelConfig.from_preset("mamba2-780m")
    n_params = logical_param_count(cfg)
    assert 7.5e8 < n_params < 8.0e8
    fpt = model_flops_per_token(cfg, 2048, n_params)
    assert fpt == 6 * n_params + 3 * ssd_flops_per_token(cfg, 2048)
    # 780m at 16,170 tokens/s on one H100 (989 TFLOP/s dense bf16) is about 8% MFU.
    assert throughput(16_170, 1.0, 1, fpt, peak_flops(torch.device("cpu"), 989))["mfu"] == pytest.approx(0.08, abs=0.005)
    eight_gpus = throughput(8 * 16_170, 2.0, 8, fpt, 989e12)
    assert eight_gpus["tokens_per_s"] == 8 * 16_170 / 2 and eight_gpus["tokens_per_s_per_gpu"] == 16_170 / 2
    assert throughput(100, 1.0, 1, fpt, None)["mfu"] is None


def test_an_untied_input_embedding_is_a_lookup_not_a_matmul():
    """Tied or not, a token's matmuls are the same (the LM head's among them): MFU does not count the lookup."""
    tied = ModelConfig.from_preset("mamba2-130m")
    untied = dataclasses.replace(tied, tie_embeddings=False)
    assert logical_param_count(untied) == logical_param_count(tied) + tied.vocab_size * tied.d_model
    assert model_flops_per_token(untied, 2048, logical_param_count(untied)) == model_flops_per_token(tied, 2048, logical_param_count(tied))


def test_peak_flops(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 500) == 500e12
    for name, want in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA B200", 2250e12),
                       ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GB200", 2500e12),
                       ("NVIDIA GH200 480GB", 989e12), ("NVIDIA GeForce RTX 3090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops(torch.device("cuda", 0)) == want, name


def test_memory_and_timer_on_cpu():
    assert 0.01 < memory_gib(torch.device("cpu")) < 1024
    timer = StepTimer(torch.device("cpu"))
    with timer.data_wait():
        sum(range(100_000))
    lap = timer.lap()
    assert lap.elapsed > 0 and 0 < lap.data_fraction <= 1
    assert timer.lap().data_fraction == 0  # a lap starts the next interval afresh


METRICS = {"step": 120, "loss": 3.4123, "lr": 2.1e-4, "grad_norm": 0.84, "tokens_per_s": 98_760.0,
           "tokens_per_s_per_gpu": 12_345.0, "mfu": 0.312, "mem_gib": 21.3, "data_fraction": 0.003}


def test_console_line():
    assert console_line(METRICS, 500) == (
        "step 120/500 | loss 3.412 | lr 2.1e-04 | grad 0.84 | 12,345 tok/s/gpu | mfu 31.2% | mem 21.3 GiB | data 0.3%")
    assert console_line({"step": 7, "val_loss": 2.5, "mfu": None}) == "step 7 | val_loss 2.500"


def test_logger_writes_json_lines_on_the_writer_only(tmp_path, capsys):
    with MetricsLogger(tmp_path / "rank1", False, False, "p", "run", {}) as other_rank:
        other_rank.log(METRICS)
    assert not (tmp_path / "rank1").exists() and capsys.readouterr().out == ""

    with MetricsLogger(tmp_path, True, False, "p", "run", {}, total_steps=500) as logger:
        logger.log(METRICS)
        logger.log({**METRICS, "step": 121, "loss": float("nan"), "mfu": None})
        # flushed at once: a crash now would lose nothing
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == METRICS
    assert json.loads(lines[1])["loss"] is None  # NaN written as null: still valid JSON
    assert capsys.readouterr().out.splitlines()[0].startswith("step 120/500 | loss 3.412")


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
    with MetricsLogger(tmp_path, True, False, "p", "run", {}) as logger:  # a run resumed from step 2
        for step in (1, 2, 3, 2, 3, 4):
            logger.log({"step": step, "loss": float(step)})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)


def test_wandb_logs_offline_without_a_key(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(tmp_path, True, True, "megassm-test", "offline-run", {"model": {"d_model": 64}}) as logger:
        logger.log(METRICS)
    assert "offline" in capsys.readouterr().out
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_a_resumed_run_goes_on_in_its_wandb_run(tmp_path, monkeypatch):
    """Resumed from the folder's checkpoint (continues): the W&B run of the history, by the id run.dir keeps; from
    scratch: a W&B run of its own."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # offline
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")

    def logged_in(continues: bool) -> str:
        with MetricsLogger(tmp_path, True, True, "megassm-test", "run", {}, continues=continues) as logger:
            logger.log(METRICS)
        return (tmp_path / "wandb_id").read_text().strip()

    first = logged_in(False)
    assert logged_in(True) == first
    fresh = logged_in(False)
    assert fresh != first
    runs = sorted(run.name.split("-")[3] for run in (tmp_path / "wandb").glob("offline-run-*"))  # offline-run-TIME-ID[-N]
    assert runs == sorted([first, first, fresh])


def write_run(run_dir: Path, steps: int, speed: float, start_loss: float = 6.5) -> Path:
    with MetricsLogger(run_dir, True, False, "p", run_dir.name, {}) as logger:
        for step in range(1, steps + 1):
            val = {"val_loss": 0.95 * start_loss / step**0.3} if step % 5 == 0 else {}
            logger.log({"step": step, "loss": start_loss / step**0.3, "tokens_per_s": speed + step, **val})
    return run_dir


def load_plot_tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools" / "plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_tool(tmp_path):
    runs = [write_run(tmp_path / "small", 20, 1000.0), write_run(tmp_path / "large", 15, 700.0, 6.0)]
    out = tmp_path / "plot.png"
    cli = [sys.executable, str(ROOT / "tools" / "plot_metrics.py"), *map(str, runs), "--out", str(out)]
    done = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 10_000


def test_plot_tool_breaks_a_line_at_a_step_that_was_not_finite_and_tells_runs_of_one_name_apart(tmp_path):
    tool = load_plot_tool()
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": None, "val_loss": None}, {"step": 3, "loss": 2.5, "val_loss": 2.6}]
    assert tool.series(records, "loss") == ([1, 2, 3], [3.0, pytest.approx(math.nan, nan_ok=True), 2.5])
    assert tool.series(records, "val_loss")[0] == [2, 3]
    assert tool.labels([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]) == [
        str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run"), "c"]


def test_plot_tool_names_a_missing_or_empty_file(tmp_path, capsys):
    tool = load_plot_tool()
    run = write_run(tmp_path / "run", 3, 1000.0)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").touch()
    for bad, why in [(tmp_path / "empty", "no records"), (tmp_path / "missing", "no such file")]:
        with pytest.raises(SystemExit) as stopped:
            tool.main([str(run), str(bad), "--out", str(tmp_path / "plot.png")])
        assert stopped.value.code == 2 and capsys.readouterr().err == f"plot_metrics.py: error: {bad / 'metrics.jsonl'}: {why}\n"
    assert not (tmp_path / "plot.png").exists()

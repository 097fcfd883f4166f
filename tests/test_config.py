"""Bad input fails at start-up with one line naming the key or file, before a model is built."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megassm.ops
from megassm.config import ConfigError, load_config, read_model_config, write_config
from megassm.ops.mamba_triton import load_triton_kernels
from megassm.train import main

GOOD = """
[model]
preset = "debug"
[parallel]
tp = 2
cp = 2
[data]
path = "{data}"
seq_len = 64
micro_batch = 2
global_batch = 4
"""


@pytest.fixture
def config_file(tmp_path: Path, prepared_data: Path):
    def write(text: str = GOOD, **replace: str) -> Path:
        path = tmp_path / "run.toml"
        body = text.format(data=prepared_data)
        for old, new in replace.items():
            body = body.replace(old, new)
        path.write_text(body)
        return path

    return write


@pytest.mark.parametrize(
    "replace, world, message",
    [
        ({"seq_len = 64": "seq_length = 64"}, 4, r"unknown key data.seq_length in .*run.toml; \[data\] has: global_batch"),
        ({"[data]": "[datta]"}, 4, r"unknown section \[datta\]"),
        ({"seq_len = 64": 'seq_len = "64"'}, 4, r"data.seq_len = '64' in .* must be an integer"),
        ({"cp = 2": "cp = 2\ndp = 3"}, 8, r"parallel.tp \* parallel.cp \* parallel.dp = 2 \* 2 \* 3 = 12, but the world size is 8"),
        ({}, 6, r"parallel.tp \* parallel.cp = 4 does not divide the world size 6"),
        ({"tp = 2": "tp = 16"}, 32, r"parallel.tp = 16 must divide the model's 8 heads"),
        ({'preset = "debug"': 'preset = "debug"\nngroups = 2', "tp = 2": "tp = 4", "cp = 2": "cp = 1"}, 4,
         r"parallel.tp = 4 must divide the model's 2 groups \(model.ngroups: B and C are split by group; raise it to a multiple"),
        ({"seq_len = 64": "seq_len = 66", "cp = 2": "cp = 4", "tp = 2": "tp = 1"}, 4, r"data.seq_len = 66 must be divisible by parallel.cp = 4"),
        ({"global_batch = 4": "global_batch = 3"}, 4, r"data.global_batch = 3 must be a multiple of data.micro_batch \* parallel.dp = 2 \* 1"),
        ({'preset = "debug"': 'preset = "mamba2-7b"'}, 4, r"model.preset = 'mamba2-7b' is not one of: .* \(in .*\)$"),
        ({'preset = "debug"': 'preset = "debug"\nvocab_size = 100'}, 4,
         r"has 512 tokens, more than model.vocab_size = 100: raise model.vocab_size"),
        ({"[data]": "[train]\ncuda_graphs = true\n[kernels]\ncompile = false\n[data]", 'preset = "debug"': 'preset = "debug-hybrid"'}, 4,
         r"train.cuda_graphs = true needs kernels.compile = true with attention blocks \('\*'\): switch"),
        ({"[data]": "[checkpoint]\nevery = -2\n[data]"}, 4, r"checkpoint.every must be a number of steps, 0 \(only at the end\) or -1"),
        ({"[data]": "[optim]\nlr = -0.001\n[data]"}, 4, r"optim.lr must be a positive number, got -0.001$"),
        ({"[data]": '[kernels]\nbackend = "triton"\n[data]'}, 4,
         r"kernels.backend = 'triton' needs CUDA tensors, these are on cpu: use 'auto' or 'torch'$"),
        ({"[data]": '[kernels]\nbackend = "cuda"\n[data]'}, 4, r"kernels.backend = 'cuda': choose one of auto, torch, triton$"),
        ({"[data]": '[kernels]\nssd = "fla"\n[data]'}, 4, r"kernels.ssd = 'fla': choose one of megassm, mamba-ssm$"),
        ({"[data]": '[train]\ndevice = "gpu"\n[data]'}, 4, r"train.device = 'gpu' in .* must be \"auto\", \"cuda\" or \"cpu\"$"),
        ({"cp = 2": 'cp = 2\nengine = "zero"'}, 4, r"parallel.engine = 'zero' in .* must be \"ddp\" or \"deepspeed\"$"),
        ({"[data]": "[train]\nloss_chunk_tokens = 0\n[data]"}, 4, r"train.loss_chunk_tokens must be at least 1, got 0$"),
        ({"[data]": "[train]\neval_every = 5\neval_samples = 0\n[data]"}, 4,
         r"train.eval_samples = 0: validation every train.eval_every = 5 steps needs samples; set train.eval_every = 0"),
    ],
    ids=["unknown-key", "unknown-section", "wrong-type", "layout-too-big", "world-not-divisible", "heads-vs-tp", "groups-vs-tp",
         "seq-len-vs-cp", "global-batch", "unknown-preset", "vocab-too-small", "cuda-graphs-vs-deepspeed", "checkpoint-every", "negative-lr",
         "triton-on-cpu", "unknown-backend", "unknown-ssd-kernels", "unknown-device", "unknown-engine", "loss-chunk", "no-eval-samples"],
)
def test_bad_config_fails_with_one_line(config_file, monkeypatch, capsys, replace, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["--config", str(config_file(**replace))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megassm-train: error: "), err
    assert re.search(message, err[0]), err[0]


def test_a_data_folders_tokenizer_of_another_size_or_damaged_fails_with_one_line(config_file, prepared_data, tmp_path, monkeypatch,
                                                                                   capsys):
    """Its ids would pass the model's embedding in the first step (an IndexError) where meta.json says fewer tokens; a
    damaged tokenizer, which the data's checksums do not cover, is said as a data mistake."""
    data = Path(shutil.copytree(prepared_data, tmp_path / "data"))
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100}))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--config", str(config_file(**{str(prepared_data): str(data)}))]) == 2
    assert capsys.readouterr().err.strip() == (f"megassm-train: error: {data / 'meta.json'} says vocab_size = 100, but its tokenizer "
                                               f"{data / 'tokenizer'} has 512 tokens: re-run tools/prepare_data.py")
    model = data / "tokenizer" / "tokenizer.model"
    model.write_bytes(model.read_bytes()[:100])  # damaged: the data's checksums do not cover the tokenizer
    assert main(["--config", str(config_file(**{str(prepared_data): str(data)}))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"megassm-train: error: the tokenizer of {data / 'meta.json'} cannot be read: tokenizer "
                                               f"{model}: not a sentencepiece model"), err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--parallel.zero_stage=2", r"parallel.zero_stage = 2 applies to parallel.engine = 'deepspeed' only; this run's engine is 'ddp'"),
        ("--run.dir=", r"run.dir is empty \(an unset variable\?\): name the run's folder"),
        ("--optim.beta1=1.5", r"optim.beta1 must be at least 0 and below 1, got 1.5$"),
        ("--model.vocab_size=10000000000", r"the model's 640.00B parameters take 1192.1 GiB of fp32 weights per rank "
                                           r"\(parallel.tp = 2\), more than the .* GiB of host memory left to each process \(on the "
                                           r"fullest node\): check the \[model\]"),
        ("--optim.beta2=-0.1", r"optim.beta2 must be at least 0 and below 1, got -0.1$"),
        ("--optim.eps=-1", r"optim.eps must be a positive number, got -1.0$"),
        ("--optim.weight_decay=-1", r"optim.weight_decay must be 0 or positive, got -1.0$"),
        ("--optim.grad_clip=nan", r"optim.grad_clip must be 0 \(off\) or positive, got nan$"),
        ("--optim.lr=inf", r"optim.lr must be a positive number, got inf$"),
        ("--optim.lr=1" + "0" * 400, r"optim.lr = 10{400} in .* is too large a number$"),
        ("--optim.decay_fraction=0", r"optim.decay_fraction must be in \(0, 1\], the share of train.steps the rate decays over at the end, "
                                     r"got 0.0$"),
        ("--optim.decay=cos", r"optim.decay = 'cos' in .* must be \"cosine\", \"linear\" or \"1-sqrt\"$"),
        ("--train.peak_tflops=0", r"train.peak_tflops must be the device's bf16 peak in TFLOP/s, a positive number"),
        ("--run.seed=18446744073709551616", r"run.seed must be within \[-2\^63, 2\^64\), got 18446744073709551616$"),
        ("--model.dt_min=-0.1", r"model.dt_min = -0.1 and model.dt_max = 0.1 must satisfy 0 < dt_min <= dt_max"),
        ("--model.dt_max=0.0001", r"model.dt_min = 0.001 and model.dt_max = 0.0001 must satisfy 0 < dt_min <= dt_max"),
        ("--model.dt_limit=[0.5, 0.1]", r"model.dt_limit = \(0.5, 0.1\) must satisfy 0 <= low < high"),
        ("--model.norm_eps=-1", r"model.norm_eps must be a positive number, got -1.0"),
        ("--model.init_std=-1", r"model.init_std must be 0 or positive, got -1.0"),
        ("--model.preset=[1]", r"model.preset = \[1\] is not one of: .* \(in .*\)$"),
        ("--logging.wandb_project=team/proj", r"logging.wandb_project = 'team/proj': a W&B project name cannot hold /; give the entity"),
        ("--run.name=2024-05-01", r"run.name = datetime.date\(2024, 5, 1\) .* must be a string \(on the command line, quote it as a "
         r"TOML string: --run.name='\"2024-05-01\"'\)$"),
        ("--checkpoint.resume=None",
         r"checkpoint.resume = .*None: no such folder; checkpoint.resume takes \"auto\", \"none\" or a checkpoint's folder$"),
    ],
)
def test_values_no_run_can_use_fail_with_one_line(config_file, monkeypatch, capsys, override, message):
    """Out-of-range or malformed values, each refused before a model is built (AdamW, the dt initialisation, torch's
    seed and W&B would otherwise fail later with a traceback, or train on NaN)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--config", str(config_file()), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megassm-train: error: "), err
    assert re.search(message, err[0]), err[0]


def test_deepspeed_not_installed_is_said_before_anything_starts(config_file, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "deepspeed" else find_spec(name, *args))
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--config", str(config_file()), "--parallel.engine=deepspeed"]) == 2
    assert capsys.readouterr().err.strip() == ("megassm-train: error: parallel.engine = 'deepspeed' needs DeepSpeed, which is not "
                                               "installed: pip install 'megassm[deepspeed]'")


@pytest.mark.parametrize("kind", ["folder", "empty name", "not utf-8"])
def test_a_config_file_that_cannot_be_read_is_named(tmp_path, monkeypatch, capsys, kind):
    path = {"folder": tmp_path, "empty name": "", "not utf-8": tmp_path / "latin1.toml"}[kind]
    (tmp_path / "latin1.toml").write_bytes(b"\xff[run]\n")
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "megassm-train: error: " + {
        "folder": f"config file {tmp_path} is a folder: give a .toml file (see configs/ for examples)",
        "empty name": "the config file's name is empty (an unset variable?): give --config FILE (see configs/ for examples)",
        "not utf-8": f"config file {path} is not UTF-8 text, as TOML must be"}[kind]


def test_missing_files_are_named(config_file, prepared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--config", str(tmp_path / "nope.toml")]) == 2
    assert capsys.readouterr().err.strip() == f"megassm-train: error: config file {tmp_path / 'nope.toml'} does not exist (see configs/ for examples)"
    assert main(["--config", str(config_file()), f"--data.path={tmp_path / 'missing'}"]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    corpus = tmp_path / "corpus.jsonl"  # a raw corpus where the prepared folder belongs
    corpus.write_text('{"text": "a document"}\n')
    assert main(["--config", str(config_file()), f"--data.path={corpus}"]) == 2
    assert capsys.readouterr().err == f"megassm-train: error: {corpus} is a file, not a prepared data folder: tokenize a raw corpus " \
        f"first, with python tools/prepare_data.py --input {corpus} --tokenizer TOKENIZER --out DIR, and give DIR as data.path\n"
    tokenizer = prepared_data / json.loads((prepared_data / "meta.json").read_text())["tokenizer"]
    moved = tokenizer.with_name("moved")
    tokenizer.rename(moved)
    try:
        assert main(["--config", str(config_file())]) == 2
        assert "tokenizer" in capsys.readouterr().err
    finally:
        moved.rename(tokenizer)


def test_the_entry_point_prints_no_traceback(config_file, tmp_path):
    """The real command line: exit code 2 and one line on stderr, nothing else."""
    result = subprocess.run([sys.executable, "-m", "megassm.train", "--config", str(config_file()), "--train.steps=zero"],
                            capture_output=True, text=True, env={"WORLD_SIZE": "4", "PATH": ""}, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "megassm-train: error: train.steps = 'zero' in " \
        f"{config_file()} with the command-line overrides must be an integer", result.stderr


def test_overrides_and_resolved_config_round_trip(config_file, tmp_path):
    cfg = load_config(config_file(), ["--train.steps=7", "--model.dt_limit=[0.001, inf]", "--run.name=x y"], world_size=4)
    assert (cfg.train.steps, cfg.model.dt_limit, cfg.run.name, cfg.parallel.dp) == (7, (0.001, float("inf")), "x y", 1)
    write_config(cfg, tmp_path / "resolved.toml")
    assert load_config(tmp_path / "resolved.toml", world_size=4) == cfg
    odd = ['--data.path={"data/web 🙂" = 3, "data/\\"code\\"\\u007f" = 1.5}', '--run.name="tab\\t🙂\\\\"']  # beyond the BMP, DEL, quotes
    cfg = load_config(config_file(), odd, world_size=4)
    assert cfg.data.folders().keys() == {str(Path.cwd() / name) for name in ("data/web 🙂", 'data/"code"\x7f')}
    write_config(cfg, tmp_path / "odd.toml")
    assert load_config(tmp_path / "odd.toml", world_size=4) == cfg
    with pytest.raises(ConfigError, match="override 'train.steps' must look like --section.key=value"):
        load_config(config_file(), ["train.steps"], world_size=4)
    with pytest.raises(ConfigError, match=r"override 'configs/debug.toml' must .* \(a config file: --config configs/debug.toml\)$"):
        load_config(None, ["configs/debug.toml"], world_size=4)  # --config forgotten


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_a_backend_on_cuda_without_the_kernels_stops_with_advice(config_file, monkeypatch, backend):
    """On CUDA, "auto" means the Triton kernels: without mamba-ssm the run stops rather than crawl on the reference."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # not installed
    monkeypatch.setattr(megassm.ops, "load_triton_kernels", load_triton_kernels.__wrapped__)  # not the cached answer
    with pytest.raises(ConfigError, match=rf"^kernels.backend = '{backend}' on CUDA needs the Triton kernels: .*package 'mamba_ssm'.*"
                                          r"pip install 'megassm\[gpu\]'.*; or choose the backend 'torch'"):
        load_config(config_file(), [f"--kernels.backend={backend}"], world_size=4)
    assert load_config(config_file(), ["--kernels.backend=torch"], world_size=4).kernels.backend == "torch"
    assert load_config(config_file(), ["--train.device=cpu"], world_size=4).train.device == "cpu"  # "auto" on CPU: the reference


def test_runtime_keys_of_old_configs_and_runs_still_work(config_file, tmp_path, capsys):
    """model.ssd_backend and model.compile moved to [kernels]: an old config keeps its choice, with one line
    per key naming the new one; a run's config.toml written before the move still says which model it holds."""
    old = config_file(**{'preset = "debug"': 'preset = "debug"\nssd_backend = "torch"\ncompile = false'})
    cfg = load_config(old, world_size=4)
    assert (cfg.kernels.backend, cfg.kernels.compile) == ("torch", False)
    assert capsys.readouterr().err.splitlines() == [f"megassm: model.ssd_backend in {old} is now kernels.backend (the old key still "
                                                    "works; rename it)", f"megassm: model.compile in {old} is now kernels.compile "
                                                    "(the old key still works; rename it)"]
    assert load_config(old, ["--kernels.backend=auto"], world_size=4).kernels.backend == "auto"  # the new key wins
    assert read_model_config(old) == cfg.model


def test_a_runs_paths_are_absolute_so_its_config_works_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    paths = ["--data.path=data/x", "--run.dir=runs/r", "--checkpoint.init_from=../hf", "--checkpoint.resume=runs/r/checkpoints/step_2"]
    cfg = load_config(None, paths, world_size=1)
    got = (cfg.data.path, cfg.run.dir, cfg.checkpoint.init_from, cfg.checkpoint.resume)
    assert got == tuple(str(tmp_path / p) for p in ("a/data/x", "a/runs/r", "hf", "a/runs/r/checkpoints/step_2"))
    write_config(cfg, tmp_path / "config.toml")
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "config.toml", world_size=None) == cfg  # read back elsewhere: the same folders
    cfg = load_config(None, ["--data.path=data/x"], world_size=1)
    assert (cfg.checkpoint.init_from, cfg.checkpoint.resume) == ("", "auto")  # not paths: left alone
    assert load_config(None, ["--data.path=data/x"], world_size=None).data.path == "data/x"  # only parsed: as written


@pytest.mark.parametrize("config", sorted(Path(__file__).parent.parent.glob("configs/*.toml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid_on_the_machines_they_are_for(config):
    """The debug configs on the quickstart's 4 processes; the GPU configs on one to four nodes of 8 GPUs."""
    for world_size in [4] if config.stem.startswith("debug") else [8, 16, 32]:
        cfg = load_config(config, world_size=world_size)
        assert cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.dp == world_size

"""The run's configuration: dataclass sections loaded from TOML, `--section.key=value` overrides, and
validation of everything that can be checked before a model is built (docs/architecture.md, section 7).

Every problem raises ConfigError with one line that names the key (and the file); the trainer
prints it and exits, so a typo costs seconds, not a queue slot.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megassm.data.mixture import MIX_BLOCK
from megassm.errors import UserError
from megassm.model.config import ModelConfig
from megassm.ops import BACKENDS, SSD_KERNELS, KernelsUnavailable, resolve_backend
from parallel import LOSS_CHUNK_TOKENS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key and says what would."""


Auto = typing.Literal["auto"]  # a key the trainer decides for itself when set to "auto"


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    name: str = ""  # for wandb and the console; the folder name of run.dir when empty


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1
    dp: int = -1  # -1: the rest of the world size
    sequence_parallel: bool = False
    engine: typing.Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 1  # deepspeed only: 1 or 2


@dataclass
class DataConfig:
    # A folder written by tools/prepare_data.py, or a table {folder = weight} of several (one tokenizer) whose samples
    # the run mixes in those proportions (megassm.data.mixture).
    path: str | dict[str, float] = ""
    seq_len: int = 2048
    micro_batch: int = 1  # sequences per rank per forward/backward
    global_batch: int = 8  # sequences per optimizer step, over all DP ranks (gradient accumulation fills it)
    verify: bool = True  # check the shards' sha256 at start-up (files unchanged since they last matched are skipped)

    def folders(self) -> dict[str, float]:
        """The prepared folders of `path` and their shares of the samples (1 for a single folder)."""
        if isinstance(self.path, dict):  # in the folders' order, whatever the table's (the order the mixture takes them in)
            largest = max(self.path.values())
            total = sum(weight / largest for weight in self.path.values())
            return {folder: self.path[folder] / largest / total for folder in sorted(self.path)}
        return {self.path: 1.0}


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    # After the warmup the rate falls from lr to min_lr at the last step along `decay` ("cosine", "linear", or "1-sqrt",
    # 1 - sqrt(progress)); over every step after the warmup, or with decay_fraction (warmup-stable-decay) only over that
    # last share of train.steps, holding lr until then: a checkpoint from before the decay can be trained further.
    decay: typing.Literal["cosine", "linear", "1-sqrt"] = "cosine"
    decay_fraction: float | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class TrainConfig:
    steps: int = 1000
    precision: typing.Literal["bf16", "fp32"] = "bf16"  # bf16: autocast, fp32 master weights
    # A recomputed block keeps only its input and recomputes the rest in backward (about a third of its time again):
    # "auto" (on a GPU with the Triton kernels, the first blocks, as few as auto_choices.training_memory_estimate needs
    # to fit within RECOMPUTE_ABOVE_SHARE of the job's smallest GPU, less COMMUNICATION_ALLOWANCE on several; the
    # start-up line says how many), true (every block), false, or how many of the first blocks.
    activation_checkpointing: bool | int | Auto = "auto"
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS  # the loss holds the logits of this many tokens per rank at a time
    # Replay the blocks' forward and backward as CUDA graphs (between their collectives under TP, SP and CP): "auto" (on
    # CUDA for micro batches of up to auto_choices.GRAPHS_AUTO_MAX_TOKENS per rank, where cuda_graph_blockers finds
    # nothing in the way; the start-up line says why not), true, false.
    cuda_graphs: bool | Auto = "auto"
    # megassm's SSD keeps its per-chunk states for the backward instead of recomputing them (one pass over x and B per
    # layer; about in_proj's output in memory): "auto" (where every block is recomputed, each holding them only in its
    # backward, or when the states of the layers not recomputed take at most auto_choices.KEEP_SSD_STATES_AUTO_SHARE of
    # the memory activation checkpointing shares out and, with an estimate of the rest of the step, at most
    # STEP_MEMORY_MAX_SHARE), true, false.
    keep_ssd_states: bool | Auto = "auto"
    log_every: int = 10
    eval_every: int = 200  # 0 disables validation
    eval_samples: int = 32  # held-out sequences per validation, the same ones every time and for every layout
    max_skipped_steps: int = 5  # consecutive non-finite steps before the run stops
    peak_tflops: float | None = None  # the device's bf16 peak for MFU, when megassm does not know it
    device: typing.Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA when there is one


@dataclass
class KernelsConfig:
    backend: str = "auto"  # the mixer's SSD, conv1d, gated norm and the loss: "auto" (Triton on CUDA), "triton", "torch" (the references)
    compile: bool = True  # on CUDA: torch.compile the RMSNorms, the loss's chunk steps (those of the torch backend, and its
    # validation), and the conv1d where no Triton kernel runs
    ssd: str = "megassm"  # the SSD's Triton kernels: "megassm" (megassm/ops/ssd_triton.py) or "mamba-ssm" (its Triton kernels)


@dataclass
class CheckpointConfig:
    every: int = 1000  # 0: only at the end; -1: never (benchmarks)
    keep: int = 3
    # Write checkpoints while training goes on: each rank copies its part of the state to host memory (page-locked,
    # kept for the next checkpoint: about its share of the weights and AdamW state), then writes it in a thread.
    # false: training waits for the files and needs no host copy.
    async_save: bool = True
    resume: str = "auto"  # "auto" (newest complete checkpoint of run.dir) | "none" | a checkpoint path
    # Let a run that starts from scratch ("none") or from an older checkpoint (a path) replace the checkpoints
    # of run.dir that are not in its history (deleted at start-up) and their metrics; without it, such a run stops.
    overwrite: bool = False
    # Start a new run from these weights: a megassm checkpoint or run, or a transformers or mamba-ssm
    # Mamba-2 folder (tools/convert_checkpoint.py). Ignored when the run resumes.
    init_from: str = ""


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "megassm"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def micro_batch_tokens(self) -> int:
        """The tokens of one micro batch on one rank (its part of the sequences under CP)."""
        return self.data.micro_batch * self.data.seq_len // self.parallel.cp

    @property
    def accumulation_steps(self) -> int:
        return self.data.global_batch // (self.data.micro_batch * self.parallel.dp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}

# Keys that left [model], which holds the architecture only: old configs and runs keep working.
MOVED_KEYS = {("model", "ssd_backend"): ("kernels", "backend"), ("model", "compile"): ("kernels", "compile")}


def load_config(path: str | Path | None, overrides: list[str] = (), world_size: int | None = 1) -> Config:
    """The TOML file (or the defaults when path is None) with `--section.key=value` overrides applied,
    for a run on world_size processes: checked against it, relative paths made absolute (None: only
    parsed and type-checked, e.g. a run's saved config). Raises ConfigError."""
    raw: dict = {}
    where = "the defaults"
    if path is not None:
        where = str(path)
        raw = read_toml(path)
    if overrides:
        where = f"{where} with the command-line overrides"
    for override in overrides:
        section, key, value = parse_override(override)
        raw.setdefault(section, {})[key] = value
    move_old_keys(raw, where)
    cfg = build_config(raw, where)
    if world_size is not None:
        make_paths_absolute(cfg)
        validate(cfg, world_size)
        check_backend(cfg)
    return cfg


def read_toml(path: str | Path) -> dict:
    """The tables of a TOML file, or ConfigError naming the file and what is wrong with it."""
    if not str(path):
        raise ConfigError("the config file's name is empty (an unset variable?): give --config FILE (see configs/ for examples)")
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist (see configs/ for examples)") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: give a .toml file (see configs/ for examples)") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text, as TOML must be") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def make_paths_absolute(cfg: Config) -> None:
    """The folders a run reads and writes, relative to the working directory, made absolute: the run's
    config.toml then names the same folders wherever a tool reads it (export, generation, resuming)."""
    ckpt = cfg.checkpoint
    cfg.run.dir = os.path.abspath(cfg.run.dir) if cfg.run.dir else ""
    if isinstance(cfg.data.path, dict):
        if "" in cfg.data.path:
            raise ConfigError("data.path names a folder \"\" (an unset variable?): name each prepared folder of the mixture")
        same: dict[str, list[str]] = {}
        for folder in cfg.data.path:
            same.setdefault(os.path.realpath(folder), []).append(folder)
        if twice := next((names for names in same.values() if len(names) > 1), None):
            raise ConfigError(f"data.path names one folder {len(twice)} times: {', '.join(twice)}")
        cfg.data.path = {os.path.abspath(folder): weight for folder, weight in cfg.data.path.items()}
    else:
        cfg.data.path = os.path.abspath(cfg.data.path) if cfg.data.path else ""
    ckpt.init_from = os.path.abspath(ckpt.init_from) if ckpt.init_from else ""
    if ckpt.resume not in ("auto", "none"):
        ckpt.resume = os.path.abspath(ckpt.resume)


def check_command_line(argv: list[str], world_size: int | None) -> None:
    """ConfigError unless the trainer's command line (`--config FILE` and `--section.key=value` overrides)
    fits world_size processes (None: an elastic range, only parsed). For a launcher: the device and its
    kernels are left to the trainer's processes (checking them here would put a CUDA context on GPU 0)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides, world_size=None)
    if world_size is not None:
        validate(cfg, world_size)


def move_old_keys(raw: dict, where: str) -> None:
    """MOVED_KEYS moved to their new place in the raw tables (a value there wins), with one line each."""
    for (section, key), (new_section, new_key) in MOVED_KEYS.items():
        table = raw.get(section)
        if isinstance(table, dict) and key in table:
            value = table.pop(key)
            if isinstance(raw.setdefault(new_section, {}), dict):
                raw[new_section].setdefault(new_key, value)
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"megassm: {section}.{key} in {where} is now {new_section}.{new_key} (the old key still works; rename it)",
                      file=sys.stderr)


def parse_override(text: str) -> tuple[str, str, object]:
    """"--section.key=value" -> (section, key, value); the value read as TOML, else as a bare string."""
    name, sep, value = text.removeprefix("--").partition("=")
    section, dot, key = name.partition(".")
    if not sep or not dot or not key:
        config = f" (a config file: --config {text})" if text.endswith(".toml") else ""
        raise ConfigError(f"override {text!r} must look like --section.key=value, e.g. --train.steps=100{config}")
    try:
        return section, key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError as error:
        if value.lstrip().startswith(("{", "[")):  # meant as a table or a list: a bare string would hide the mistake
            raise ConfigError(f"--{name}={value} is not a valid TOML table or list ({error}); quote the strings in it, "
                              f"e.g. --data.path='{{\"data/web\" = 3, \"data/code\" = 1}}'") from None
        return section, key, value


def build_config(raw: dict, where: str) -> Config:
    """Typed sections from the TOML tables; unknown sections and keys and wrong types are errors."""
    sections = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}] in {where}: the sections are {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] in {where} must be a table of keys")
    for name, factory in SECTIONS.items():
        table = dict(raw.get(name, {}))
        if name == "model":
            sections[name] = build_model_config(table, where)
        else:
            sections[name] = factory(**typed_fields(factory, name, table, where))
    return Config(**sections)


def build_model_config(table: dict, where: str) -> ModelConfig:
    """[model]: a preset, optionally with some of its keys changed, or every shape key given."""
    preset = table.pop("preset", None)
    values = typed_fields(ModelConfig, "model", table, where)
    try:
        return ModelConfig.from_preset(preset, **values) if preset is not None else ModelConfig(**values)
    except ValueError as error:
        raise ConfigError(f"{error} (in {where})") from None


def typed_fields(cls: type, section: str, table: dict, where: str) -> dict:
    """table's values checked against the dataclass cls's field types (ints are accepted as floats)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in table.items():
        if key not in fields:
            known = ", ".join(sorted(fields) + (["preset"] if section == "model" else []))
            raise ConfigError(f"unknown key {section}.{key} in {where}; [{section}] has: {known}")
        out[key] = coerce(value, hints[key], f"{section}.{key}", where)
    return out


def coerce(value: object, hint: object, key: str, where: str) -> object:
    """value as the type `hint` (int, float, bool, str, Literal[...], X | None, tuple[float, float]), or ConfigError."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{key} = {value} in {where} is too large a number") from None
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is typing.Literal and value in typing.get_args(option):
            return value
        if typing.get_origin(option) is dict and isinstance(value, dict):
            key_kind, value_kind = typing.get_args(option)
            return {coerce(k, key_kind, key, where): coerce(v, value_kind, f"{key}[{k!r}]", where) for k, v in value.items()}
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            kinds = typing.get_args(option)
            if len(value) == len(kinds):
                return tuple(coerce(v, k, key, where) for v, k in zip(value, kinds))
    wanted = " or ".join(type_name(o) for o in options)
    quoting = ""
    if str in options and "command-line" in where:
        quoting = f" (on the command line, quote it as a TOML string: --{key}='\"{value}\"')"
    raise ConfigError(f"{key} = {value!r} in {where} must be {wanted}{quoting}")


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "omitted"}


def type_name(hint: object) -> str:
    """How an error names a value of type `hint`."""
    if typing.get_origin(hint) is typing.Literal:
        *others, last = (f'"{choice}"' for choice in typing.get_args(hint))
        return f"{', '.join(others)} or {last}" if others else last
    if typing.get_origin(hint) is dict:
        return "a table of folder = weight"
    return TYPE_NAMES.get(hint, "a list of two numbers")


def validate(cfg: Config, world_size: int) -> None:
    """Everything checkable before any model or data is touched: each value within its range, the parallel layout
    against the world size and the shapes, the named choices, the optimizer, the run's paths and names."""
    validate_counts(cfg)
    validate_layout(cfg, world_size)
    validate_choices(cfg)
    validate_optim(cfg.optim)
    validate_run(cfg)


def validate_counts(cfg: Config) -> None:
    """Counts of steps, tokens and samples, each within the range it can take."""
    par, data, optim, train, ckpt = cfg.parallel, cfg.data, cfg.optim, cfg.train, cfg.checkpoint
    positive = {"parallel.tp": par.tp, "parallel.cp": par.cp, "data.seq_len": data.seq_len, "data.micro_batch": data.micro_batch,
                "data.global_batch": data.global_batch, "train.steps": train.steps, "train.log_every": train.log_every,
                "checkpoint.keep": ckpt.keep, "train.max_skipped_steps": train.max_skipped_steps,
                "train.loss_chunk_tokens": train.loss_chunk_tokens}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in {"train.eval_every": train.eval_every, "train.eval_samples": train.eval_samples,
                       "optim.warmup_steps": optim.warmup_steps}.items():
        if value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}")
    if ckpt.every < -1:
        raise ConfigError(f"checkpoint.every must be a number of steps, 0 (only at the end) or -1 (never), got {ckpt.every}")
    if train.eval_every and train.eval_samples < 1:
        raise ConfigError(f"train.eval_samples = {train.eval_samples}: validation every train.eval_every = {train.eval_every} "
                          "steps needs samples; set train.eval_every = 0 to validate never")
    if train.peak_tflops is not None and not 0 < train.peak_tflops < math.inf:
        raise ConfigError(f"train.peak_tflops must be the device's bf16 peak in TFLOP/s, a positive number (omit it where megassm "
                          f"knows the device), got {train.peak_tflops}")


def validate_layout(cfg: Config, world_size: int) -> None:
    """tp x cp x dp against the world size (parallel.dp = -1 resolved here), and the shapes each dimension splits."""
    par, data, train = cfg.parallel, cfg.data, cfg.train
    if par.dp == -1:
        if world_size % (par.tp * par.cp):
            raise ConfigError(f"parallel.tp * parallel.cp = {par.tp * par.cp} does not divide the world size {world_size}")
        par.dp = world_size // (par.tp * par.cp)
    if par.dp < 1 or par.tp * par.cp * par.dp != world_size:
        raise ConfigError(f"parallel.tp * parallel.cp * parallel.dp = {par.tp} * {par.cp} * {par.dp} = {par.tp * par.cp * par.dp}, "
                          f"but the world size is {world_size} (set parallel.dp = -1 to use the rest)")
    try:
        cfg.model.check_tensor_parallel(par.tp)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if data.seq_len % par.cp:
        raise ConfigError(f"data.seq_len = {data.seq_len} must be divisible by parallel.cp = {par.cp}")
    if par.cp > 1 and data.seq_len // par.cp < cfg.model.d_conv - 1:
        raise ConfigError(f"data.seq_len / parallel.cp = {data.seq_len // par.cp} tokens per CP rank: at least "
                          f"model.d_conv - 1 = {cfg.model.d_conv - 1} needed")
    if par.sequence_parallel and (par.tp == 1 or (data.seq_len // par.cp) % par.tp):
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1 dividing data.seq_len / parallel.cp = "
                          f"{data.seq_len // par.cp}")
    if data.global_batch % (data.micro_batch * par.dp):
        raise ConfigError(f"data.global_batch = {data.global_batch} must be a multiple of data.micro_batch * parallel.dp = "
                          f"{data.micro_batch} * {par.dp}")
    if train.eval_every and train.eval_samples % (data.micro_batch * par.dp):
        raise ConfigError(f"train.eval_samples = {train.eval_samples} must be a multiple of data.micro_batch * parallel.dp = "
                          f"{data.micro_batch} * {par.dp}")


def validate_choices(cfg: Config) -> None:
    """The keys that name one of a few choices, and the choices that exclude each other."""
    par, train = cfg.parallel, cfg.train
    choices = {"kernels.backend": (cfg.kernels.backend, BACKENDS), "kernels.ssd": (cfg.kernels.ssd, SSD_KERNELS)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(allowed)}")
    recompute, blocks = train.activation_checkpointing, cfg.model.n_layer
    if type(recompute) is int and not 0 <= recompute <= blocks:
        raise ConfigError(f"train.activation_checkpointing = {recompute}: the number of first blocks to recompute is 0 to "
                          f"model.n_layer = {blocks}; or choose true (every block), false or \"auto\"")
    if train.cuda_graphs is True and cuda_graph_blockers(cfg):
        raise ConfigError(f"train.cuda_graphs = true needs {' and '.join(cuda_graph_blockers(cfg))}: switch one of them, or use \"auto\"")
    if par.engine == "ddp" and par.zero_stage != 1:
        raise ConfigError(f"parallel.zero_stage = {par.zero_stage} applies to parallel.engine = 'deepspeed' only; this run's "
                          "engine is 'ddp': set parallel.engine = 'deepspeed' for ZeRO, or leave zero_stage out")
    if par.engine == "deepspeed" and par.zero_stage not in (1, 2):
        raise ConfigError(f"parallel.zero_stage = {par.zero_stage}: megassm supports ZeRO stages 1 and 2 "
                          "(its TP layers shard parameters themselves, which stage 3 would repeat)")
    if par.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.engine = 'deepspeed' needs DeepSpeed, which is not installed: pip install 'megassm[deepspeed]'")


def validate_run(cfg: Config) -> None:
    """The run's seed, folders and names."""
    if not -(2**63) <= cfg.run.seed < 2**64:
        raise ConfigError(f"run.seed must be within [-2^63, 2^64), got {cfg.run.seed}")
    if not cfg.run.dir:
        raise ConfigError("run.dir is empty (an unset variable?): name the run's folder, e.g. --run.dir=runs/my-run")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: point it at a folder made by tools/prepare_data.py "
                          "(bash launch/quickstart.sh makes one from the built-in corpus)")
    if isinstance(cfg.data.path, dict):
        validate_mixture(cfg.data.path)
    if bad := set(WANDB_PROJECT_FORBIDDEN) & set(cfg.logging.wandb_project):
        raise ConfigError(f"logging.wandb_project = {cfg.logging.wandb_project!r}: a W&B project name cannot hold "
                          f"{' '.join(sorted(bad))}; give the entity (team) in WANDB_ENTITY")


def validate_mixture(weights: dict[str, float]) -> None:
    """data.path's weights: positive numbers, each at least the share a block of the mixture can hold."""
    for folder, weight in weights.items():
        if not 0 < weight < math.inf:
            raise ConfigError(f"data.path's weight of {folder} must be a positive number, got {weight}")
    smallest, largest = min(weights, key=weights.get), max(weights.values())
    if weights[smallest] / largest / sum(weight / largest for weight in weights.values()) < 1 / MIX_BLOCK:
        raise ConfigError(f"data.path's weight of {smallest}, {weights[smallest]}, is below 1/{MIX_BLOCK} of the weights' sum, "
                          "the finest share the mixture keeps: raise it or leave the folder out")


# Characters W&B refuses in a project's name.
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"


def validate_optim(optim: OptimConfig) -> None:
    """[optim]'s values, each within what AdamW and the schedule can use (NaN fails every test)."""
    if not 0 < optim.lr < math.inf:
        raise ConfigError(f"optim.lr must be a positive number, got {optim.lr}")
    if not 0 <= optim.min_lr <= optim.lr:
        raise ConfigError(f"optim.min_lr = {optim.min_lr} must be between 0 and optim.lr = {optim.lr}")
    if optim.decay_fraction is not None and not 0 < optim.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], the share of train.steps the rate decays over at the end, "
                          f"got {optim.decay_fraction}")
    if not 0 <= optim.grad_clip <= math.inf:
        raise ConfigError(f"optim.grad_clip must be 0 (off) or positive, got {optim.grad_clip}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(optim, key) < 1:
            raise ConfigError(f"optim.{key} must be at least 0 and below 1, got {getattr(optim, key)}")
    if not 0 < optim.eps < math.inf:
        raise ConfigError(f"optim.eps must be a positive number, got {optim.eps}")
    if not 0 <= optim.weight_decay < math.inf:
        raise ConfigError(f"optim.weight_decay must be 0 or positive, got {optim.weight_decay}")


def cuda_graph_blockers(cfg: Config) -> list[str]:
    """What keeps the blocks from being replayed as CUDA graphs under this config (empty: nothing).
    Attention's flex_attention copies from the CPU when it runs eager, which a capture forbids."""
    blockers = []
    if "*" in cfg.model.layer_kinds and not cfg.kernels.compile:
        blockers.append("kernels.compile = true with attention blocks ('*')")
    return blockers


def pick_device(choice: str) -> torch.device:
    """The device train.device names: this process's GPU (LOCAL_RANK under torchrun) or the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but torch sees no CUDA device: use 'auto' or 'cpu'")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def check_backend(cfg: Config) -> None:
    """kernels.backend can run on the device the trainer will pick (train.device), before a model is built."""
    try:
        resolve_backend(cfg.kernels.backend, pick_device(cfg.train.device))
    except KernelsUnavailable as error:
        raise ConfigError(f"kernels.{error}") from None


def write_config(cfg: Config, path: Path) -> None:
    """The resolved configuration as TOML, loadable again with load_config."""
    path.write_text("\n".join(section_toml(name, values) for name, values in cfg.to_dict().items()))


def section_toml(name: str, values: dict) -> str:
    """One TOML table of plain values (None values left out)."""
    return "".join([f"[{name}]\n", *(f"{key} = {toml_value(value)}\n" for key, value in values.items() if value is not None)])


def read_model_config(path: Path) -> ModelConfig:
    """The [model] table of a TOML file (a run's config.toml, a converted checkpoint's model.toml); the runtime
    keys that files written before MOVED_KEYS still hold there are not architecture and are left out."""
    raw = read_toml(path)
    table = dict(raw.get("model", {}))
    for key in [key for section, key in MOVED_KEYS if section == "model"]:
        table.pop(key, None)
    return build_model_config(table, str(path))


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):  # a TOML basic string: JSON's escapes, with DEL too, and characters beyond the BMP as they are
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)

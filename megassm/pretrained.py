"""Model weights in and out of folders of three formats: megassm checkpoints, transformers folders (Mamba2, and
the hybrids NemotronH and Bamba) and mamba-ssm (state-spaces) folders.

`load_pretrained` reads any of them, telling them apart by their files, as a ModelConfig and a logical
megassm state dict: the trainer's `checkpoint.init_from` (continue pretraining a published or converted
model) and tools/convert_checkpoint.py use it. Every name and shape is checked against what the folder's
own config implies, so a wrong or truncated file fails here with its name, not later inside the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from megassm.errors import UserError
from megassm.checkpoint import (CONFIG_FILE, MODEL_FILE, TRAINER_FILE, DamagedCheckpoint, architecture, checkpoints_folder, checkpoints_in,
                                read_model_state)
from megassm.checkpoint_files import first_damaged_file
from megassm.config import ConfigError, load_config
from megassm.config import read_model_config
from megassm.data import Meta
from megassm.data.shards import META_FILE
from megassm.hf import (
    from_mamba_ssm_state_dict,
    hf_config_dict,
    mamba_ssm_config_dict,
    model_config_from_hf,
    model_config_from_mamba_ssm,
    to_mamba_ssm_state_dict,
)
from megassm.hf_hybrid import (
    BAMBA,
    NEMOTRON_H,
    bamba_config_dict,
    model_config_from_bamba,
    model_config_from_nemotron_h,
    nemotron_h_config_dict,
)
from megassm.hf_tensors import BACKBONE_LAYOUT, BAMBA_LAYOUT, Layout, from_transformers, to_transformers
from megassm.model import Mamba2LM, ModelConfig

MEGASSM, TRANSFORMERS, MAMBA_SSM = "megassm", "transformers", "mamba-ssm"
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the tools' --dtype, spelled as train.precision
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # each possibly sharded, with a NAME.index.json
DESCRIPTIONS = {
    MEGASSM: f"a megassm checkpoint ({TRAINER_FILE} and DCP files) or run folder (checkpoints/step_N/)",
    TRANSFORMERS: 'a transformers folder (config.json with "model_type" "mamba2", "nemotron_h" or "bamba")',
    MAMBA_SSM: "a mamba-ssm folder (config.json with d_model, n_layer, ssm_cfg)",
}
MAMBA2 = "mamba2"


@dataclasses.dataclass(frozen=True)
class HFFormat:
    """A transformers model megassm reads and writes: its config mapping and where it keeps the tensors."""

    architecture: str
    config_dict: Callable[[ModelConfig], dict]  # raises ValueError if the format cannot hold the model
    model_config: Callable[[dict], ModelConfig]  # from the config's to_dict()
    layout: Layout
    # With tie_word_embeddings transformers ties lm_head to the embedding, and the folder may leave lm_head.weight out (else
    # it needs one); a stored lm_head.weight that differs from the embedding, transformers computes with.
    ties_head: bool


HF_FORMATS = {  # by config.json's model_type
    MAMBA2: HFFormat("Mamba2ForCausalLM", hf_config_dict, model_config_from_hf, BACKBONE_LAYOUT, ties_head=True),
    NEMOTRON_H: HFFormat("NemotronHForCausalLM", nemotron_h_config_dict, model_config_from_nemotron_h, BACKBONE_LAYOUT, ties_head=False),
    BAMBA: HFFormat("BambaForCausalLM", bamba_config_dict, model_config_from_bamba, BAMBA_LAYOUT, ties_head=True),
}


def default_hf_format(cfg: ModelConfig) -> str:
    """The transformers model a model exports to unless asked: Mamba2 for Mamba-2 blocks only, NemotronH for a hybrid."""
    return MAMBA2 if not cfg.layer_kinds.strip("M") else NEMOTRON_H


class PretrainedError(UserError, ValueError):
    """A folder that cannot be read as a Mamba-2 model, or one that does not fit; the message names the file."""


def detect_format(path: str | Path) -> str:
    """MEGASSM, TRANSFORMERS or MAMBA_SSM, from the files in the folder; PretrainedError if it is none of them."""
    path = Path(path)
    if not path.is_dir():
        raise PretrainedError(f"{path}: no such folder")
    if (path / TRAINER_FILE).is_file() or checkpoints_in(path):
        return MEGASSM
    config = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if config.get("model_type") in HF_FORMATS:
        return TRANSFORMERS
    if "model_type" in config:
        raise PretrainedError(f"{path / 'config.json'}: model_type {config['model_type']!r}; megassm reads transformers' "
                              f"{', '.join(map(repr, HF_FORMATS))} only")
    if {"d_model", "n_layer"} <= config.keys():
        return MAMBA_SSM
    if checkpoints_folder(path).is_dir() or (path / CONFIG_FILE).is_file():
        raise PretrainedError(f"{path} is a run's folder without a complete checkpoint yet (checkpoints/step_N/): wait for its first "
                              "save, or give another run or checkpoint")
    raise PretrainedError(f"{path} is none of: {'; '.join(DESCRIPTIONS.values())}")


def load_pretrained(path: str | Path, expect: ModelConfig | None = None,
                    dtype: torch.dtype | None = torch.float32) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The model in `path` (any of the three formats) as its ModelConfig and logical megassm state dict (in `dtype`,
    or as stored where None; on CPU). With `expect`, the model must also be that config's (its shapes and `architecture`:
    PretrainedError naming the fields that differ), as when the trainer loads it into the model its [model] table builds."""
    path = Path(path)
    fmt = detect_format(path)
    cfg, state = _READERS[fmt](path)
    if expect is not None and (_shapes(expect), architecture(expect)) != (_shapes(cfg), architecture(cfg)):
        theirs, ours = architecture(cfg), architecture(expect)
        differ = [f"{key} {theirs[key]} (configured: {ours[key]})" for key in theirs if theirs[key] != ours[key]]
        raise PretrainedError(f"{path} does not fit the configured model; it has {', '.join(differ)}")
    return cfg, state if dtype is None else {name: tensor.to(dtype) for name, tensor in state.items()}


def newest_readable_checkpoint(path: str | Path) -> Path:
    """A megassm checkpoint folder itself, or a run folder's newest complete checkpoint with all its files: as
    when the trainer resumes, a newer damaged one is skipped, with a warning on stderr naming its missing file."""
    path = Path(path)
    if (path / TRAINER_FILE).is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise PretrainedError(f"{path}: no {TRAINER_FILE} nor complete checkpoints/step_N/ here")
    for checkpoint in reversed(found):
        problem = first_damaged_file(checkpoint)
        if problem is None:
            return checkpoint
        print(f"warning: skipping damaged checkpoint {checkpoint}: {problem}", file=sys.stderr)
    raise PretrainedError(f"{path}: every checkpoint in checkpoints/ is damaged (the oldest: {problem})")


def run_tokenizer(checkpoint: Path) -> Path:
    """The tokenizer of the data a megassm run trained on: of data.path's folders in its checkpoint's config.toml.
    FileNotFoundError when the checkpoint names no data (a converted one) or that data is not here."""
    config = newest_readable_checkpoint(checkpoint) / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found, which names the run's data and so its tokenizer")
    folders = [Path(folder) for folder in load_config(config, world_size=None).data.folders()]
    for data in folders:  # a mixture's folders share the tokenizer: any one here will do
        if (data / META_FILE).is_file():
            return data / Meta.read(data).tokenizer
    relative = "" if folders[0].is_absolute() else ", relative to the folder the run was started from"
    raise FileNotFoundError(f"the run's data.path = {', '.join(map(str, folders))} (in {config}) is not a prepared data folder "
                            f"here{relative}, so its tokenizer cannot be found")


def checkpoint_model_config(checkpoint: Path) -> ModelConfig:
    """The model of a checkpoint: its run's config.toml, or a converted one's model.toml."""
    for name in (CONFIG_FILE, MODEL_FILE):
        if (checkpoint / name).is_file():
            try:
                return read_model_config(checkpoint / name)
            except ConfigError as error:
                raise PretrainedError(str(error)) from None
    raise PretrainedError(f"{checkpoint}: no {CONFIG_FILE} nor {MODEL_FILE} to say which model it holds")


def save_transformers(cfg: ModelConfig, state: dict[str, Tensor], out: Path, dtype: torch.dtype = torch.float32,
                      token_ids: dict[str, int | None] | None = None, model_type: str | None = None) -> None:
    """A folder `transformers.AutoModelForCausalLM.from_pretrained` loads: config.json and model.safetensors
    (sharded above 5 GB), of the model_type in HF_FORMATS (default: default_hf_format). token_ids: bos_token_id,
    eos_token_id, pad_token_id (None where the tokenizer has none; left out, transformers' defaults would claim
    some). Raises ValueError, before writing anything, if the format cannot hold the model."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoConfig

    model_type = model_type or default_hf_format(cfg)
    fmt = HF_FORMATS[model_type]
    fields = {key: value for key, value in fmt.config_dict(cfg).items() if key != "model_type"}
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
    AutoConfig.for_model(model_type, **fields, **ids, dtype=dtype).save_pretrained(out)
    tensors = to_transformers(_cast(state, dtype), cfg, fmt.layout)
    if cfg.tie_embeddings and fmt.ties_head:
        del tensors["lm_head.weight"]  # transformers ties it to the embedding when it loads
    elif cfg.tie_embeddings:
        tensors["lm_head.weight"] = tensors["lm_head.weight"].clone()  # saved as its own tensor, not deduplicated away
    save_torch_state_dict(tensors, out)
    umask = os.umask(0)
    os.umask(umask)
    for weights in out.glob("model*.safetensors"):  # safetensors writes them readable by their owner alone
        weights.chmod(0o666 & ~umask)


def save_mamba_ssm(cfg: ModelConfig, state: dict[str, Tensor], out: Path, dtype: torch.dtype = torch.float32) -> None:
    """A folder mamba-ssm's `MambaLMHeadModel.from_pretrained` loads: config.json and pytorch_model.bin.
    Raises ValueError, before writing anything, if mamba-ssm cannot express the model."""
    config = mamba_ssm_config_dict(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=4))
    torch.save(to_mamba_ssm_state_dict(_cast(state, dtype), cfg), out / "pytorch_model.bin")


def _cast(state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Cast before mapping, so that a tied lm_head stays the embedding's tensor (saved once)."""
    return {name: tensor.to(dtype) for name, tensor in state.items()}


def _read_megassm(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    checkpoint = newest_readable_checkpoint(path)
    cfg = checkpoint_model_config(checkpoint)
    try:
        state = read_model_state(checkpoint)
    except DamagedCheckpoint as error:
        raise PretrainedError(f"checkpoint {checkpoint} is damaged: {first_damaged_file(checkpoint) or error}; "
                              "use an earlier one (checkpoints/step_N), or the run folder for its newest complete one") from None
    _check_tensors(state, _shapes(cfg), checkpoint)
    return cfg, state


def _read_transformers(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    from transformers import AutoConfig  # fills in the defaults a config.json may leave out

    fmt = HF_FORMATS[_read_json(path / "config.json")["model_type"]]
    cfg = _published_config(path, lambda: fmt.model_config(AutoConfig.from_pretrained(path).to_dict()))
    theirs = _published_tensors(path, cfg, partial(to_transformers, layout=fmt.layout), tied_head_optional=fmt.ties_head)
    head = theirs.get("lm_head.weight")
    if cfg.tie_embeddings and head is not None and not torch.equal(head, theirs[fmt.layout.embedding]):
        raise PretrainedError(f"{path / 'config.json'}: tie_word_embeddings is true, but lm_head.weight is not {fmt.layout.embedding}, "
                              f"and transformers' {fmt.architecture} computes with lm_head.weight: set tie_word_embeddings to false")
    return cfg, from_transformers(theirs, cfg, fmt.layout)


def _read_mamba_ssm(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    cfg = _published_config(path, lambda: model_config_from_mamba_ssm(_read_json(path / "config.json")))
    return cfg, from_mamba_ssm_state_dict(_published_tensors(path, cfg, to_mamba_ssm_state_dict, tied_head_optional=False), cfg)


def _published_config(path: Path, read: Callable[[], ModelConfig]) -> ModelConfig:
    """A published folder's ModelConfig, read by `read`; PretrainedError naming config.json if megassm cannot represent it."""
    from huggingface_hub.errors import StrictDataclassError  # transformers' config classes validate with it

    try:
        return read()
    except KeyError as error:
        raise PretrainedError(f"{path / 'config.json'} lacks {error}") from None
    except ValueError as error:
        raise PretrainedError(f"{path / 'config.json'}: {error}") from None
    except (TypeError, StrictDataclassError) as error:  # a field of the wrong type, values that contradict each other
        raise PretrainedError(f"{path / 'config.json'}: {str(error).strip().splitlines()[-1]}") from None


def _published_tensors(path: Path, cfg: ModelConfig, to_theirs: Callable, tied_head_optional: bool) -> dict[str, Tensor]:
    """A published folder's tensors, checked in the format's own names and shapes against its config
    (tied_head_optional: the format may leave out lm_head.weight when tied)."""
    theirs = _read_weights(path)
    optional = {"lm_head.weight"} if cfg.tie_embeddings and tied_head_optional else set()
    _check_tensors(theirs, {name: t.shape for name, t in to_theirs(_meta_state(cfg), cfg).items()}, path, optional)
    return theirs


_READERS = {MEGASSM: _read_megassm, TRANSFORMERS: _read_transformers, MAMBA_SSM: _read_mamba_ssm}


def _read_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's first weight format found (WEIGHT_FILES), its single file before a sharded index
    (as transformers reads them: saving unsharded over a sharded folder leaves the index behind)."""
    for name in WEIGHT_FILES:
        index = path / f"{name}.index.json"
        if (path / name).is_file():
            files = [name]
        else:
            files = sorted(set(_read_json(index).get("weight_map", {}).values())) if index.is_file() else []
        if files:
            return {key: tensor for file in files for key, tensor in _read_weight_file(path / file).items()}
    raise PretrainedError(f"{path}: no weights ({' or '.join(WEIGHT_FILES)}, or a sharded index of them)")


def _read_weight_file(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as error:
        raise PretrainedError(f"{file}: cannot read it ({str(error).splitlines()[0]})") from None


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise PretrainedError(f"{file} is not valid JSON: {error}") from None


def _meta_state(cfg: ModelConfig) -> dict[str, Tensor]:
    """The state dict of the model cfg describes, as shapes only (meta tensors: no memory, no init)."""
    with torch.device("meta"):
        return Mamba2LM(cfg).state_dict()


def _shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in _meta_state(cfg).items()}


def _check_tensors(got: dict[str, Tensor], want: dict[str, torch.Size], where: Path, optional: set[str] = frozenset()) -> None:
    """PretrainedError unless `got` has exactly the names (but `optional`) and shapes of `want`."""
    missing, unexpected = sorted(want.keys() - got.keys() - optional), sorted(got.keys() - want.keys())
    if missing or unexpected:
        listed = [f"{len(names)} {kind} ({', '.join(names[:3])}{' ...' if len(names) > 3 else ''})"
                  for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise PretrainedError(f"{where}: tensors do not match the model its config describes: {'; '.join(listed)}")
    for name, tensor in got.items():
        if tensor.shape != want[name]:
            raise PretrainedError(f"{where}: {name} has shape {tuple(tensor.shape)}, its config implies {tuple(want[name])}")

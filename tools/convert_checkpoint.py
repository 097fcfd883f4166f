"""Convert Mamba-2 and hybrid checkpoints between megassm and the published formats.

    python tools/convert_checkpoint.py to-hf runs/debug/checkpoints/step_300 exports/debug-hf [--dtype bf16] [--format bamba]
    python tools/convert_checkpoint.py to-mamba-ssm runs/debug exports/debug-mamba-ssm
    python tools/convert_checkpoint.py from-hf path/to/mamba2-hf checkpoints/mamba2-hf
    python tools/convert_checkpoint.py from-mamba-ssm path/to/mamba2-130m checkpoints/mamba2-130m

to-hf writes config.json and model.safetensors, which transformers' AutoModelForCausalLM.from_pretrained
loads, of the model --format names; by default Mamba2ForCausalLM for a model of Mamba-2 blocks only and
NemotronHForCausalLM for a hybrid (any model.pattern; it needs model.rope = false and mlp_activation = "relu2").
--format bamba writes BambaForCausalLM, for a pattern of "M-" and "*-" pairs (a Mamba-2 or attention block,
then an MLP block) with mlp_activation = "swiglu" and RoPE. A model the format cannot hold is refused before
anything is written, naming the key and the format that fits. to-hf also writes the run's tokenizer
(--tokenizer, else the one of data.path in the checkpoint's config.toml; an error when neither is found): an
HF tokenizer as it is; a sentencepiece model converted to tokenizer.json when transformers reproduces its ids
exactly, else copied as tokenizer.model. to-mamba-ssm writes config.json and pytorch_model.bin for
mamba_ssm's MambaLMHeadModel.from_pretrained (Mamba-2 blocks only). The source may also be a run folder: its
newest checkpoint whose files are all there (a damaged newer one is skipped).

from-hf (a transformers Mamba2, NemotronH or Bamba folder) and from-mamba-ssm write a megassm checkpoint at
step 0 without optimizer state (DCP's files, model.toml, trainer.json): continue pretraining from it, or from
the original folder, with checkpoint.init_from, on data prepared with the model's tokenizer (a transformers
folder usually holds it; the state-spaces models use EleutherAI/gpt-neox-20b's).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import sentencepiece

from megassm.checkpoint import save_model_checkpoint
from megassm.data import DataError, load_tokenizer
from megassm.data.tokenizer import HF_FILES, SENTENCEPIECE_FILE, SentencePieceTokenizer
from megassm.errors import exit_on_user_error
from megassm.pretrained import (
    DESCRIPTIONS,
    HF_FORMATS,
    MAMBA_SSM,
    MEGASSM,
    TRANSFORMERS,
    WEIGHT_DTYPES,
    default_hf_format,
    detect_format,
    load_pretrained,
    newest_readable_checkpoint,
    run_tokenizer,
    save_mamba_ssm,
    save_transformers,
)

if TYPE_CHECKING:  # transformers is imported only where it is used: --help and the other commands stay quick
    from transformers import PreTrainedTokenizerFast

COMMANDS = {"to-hf": MEGASSM, "to-mamba-ssm": MEGASSM, "from-hf": TRANSFORMERS, "from-mamba-ssm": MAMBA_SSM}  # -> input format
# Texts on which a sentencepiece model converted to an HF tokenizer must give the very same ids: runs of
# spaces, tabs, newlines, code, digits, and characters that only byte fallback can encode.
PROBES = ["Hello, world!", "  two leading spaces,\ttabs\tand\nnewlines\n\n", "def f(x):\n    return x ** 2  # 1234567890",
          "Ünïcödé — 中文 🙂 ∑", "a  b   c    d"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, fmt in COMMANDS.items():
        command = commands.add_parser(name, help=f"from {DESCRIPTIONS[fmt]}")
        command.add_argument("source", type=Path, help=DESCRIPTIONS[fmt])
        command.add_argument("out", type=Path, help="the folder to write (new or empty)")
        if name.startswith("to-"):
            command.add_argument("--dtype", choices=WEIGHT_DTYPES, default="fp32", help="the weights' precision (default: fp32)")
        if name == "to-hf":
            command.add_argument("--tokenizer", type=Path, help="the tokenizer to export (default: the run's, from config.toml data.path)")
            command.add_argument("--format", choices=HF_FORMATS, help="the transformers model_type to write (default: mamba2 for a "
                                 "model of Mamba-2 blocks only, nemotron_h for a hybrid)")
    args = parser.parse_args(argv)
    try:
        print(convert(args))
    except (OSError, ValueError) as error:  # PretrainedError, ConfigError, DataError and unwritable folders among them
        exit_on_user_error(__file__, str(error))


def convert(args: argparse.Namespace) -> str:
    """Run one command; returns the line to print."""
    found = detect_format(args.source)
    wanted = COMMANDS[args.command]
    if found != wanted:
        other = next(name for name, fmt in COMMANDS.items() if fmt == found)
        raise ValueError(f"{args.source} is {DESCRIPTIONS[found]}, not {DESCRIPTIONS[wanted]}: use {other}")
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} is not empty: give a new folder")
    source = newest_readable_checkpoint(args.source) if found == MEGASSM else args.source
    cfg, state = load_pretrained(source)
    shape = f"d_model {cfg.d_model}, {cfg.n_layer} layers, vocabulary {cfg.vocab_size}"
    if args.command in ("to-hf", "to-mamba-ssm"):
        for name in state:  # cast a tensor at a time, each read copy let go as it goes: an 8B model's is 32 GB
            state[name] = state[name].to(WEIGHT_DTYPES[args.dtype])
    if args.command == "to-hf":
        model_type = args.format or default_hf_format(cfg)
        HF_FORMATS[model_type].config_dict(cfg)  # a model the format cannot hold fails here, before anything is written
        token_ids, tokenizer_note = export_tokenizer(args.tokenizer or tokenizer_to_export(source), args.out, cfg.vocab_size)
        save_transformers(cfg, state, args.out, WEIGHT_DTYPES[args.dtype], token_ids, model_type)
        limit = ""
        if tuple(cfg.dt_limit) != (0.0, math.inf):  # transformers 5.25's step of one token has no clamp
            limit = (f"; note: transformers' cached generation leaves out time_step_limit = {list(cfg.dt_limit)} (its full "
                     "forward applies it)")
        return f"wrote {args.out}: transformers {HF_FORMATS[model_type].architecture} ({shape}, {args.dtype}); {tokenizer_note}{limit}"
    if args.command == "to-mamba-ssm":
        save_mamba_ssm(cfg, state, args.out, WEIGHT_DTYPES[args.dtype])
        return f"wrote {args.out}: mamba-ssm MambaLMHeadModel ({shape}, {args.dtype}); no tokenizer: mamba-ssm loads none"
    save_model_checkpoint(cfg, state, args.out)
    has_tokenizer = any((args.source / name).is_file() for name in (*HF_FILES, SENTENCEPIECE_FILE))
    tokenizer = f"--tokenizer {args.source}" if has_tokenizer else "the model's tokenizer"
    return f"wrote {args.out}: megassm checkpoint at step 0 ({shape}); continue pretraining with checkpoint.init_from, on data prepared with {tokenizer}"


def tokenizer_to_export(checkpoint: Path) -> Path:
    """The tokenizer of the data the checkpoint's run trained on (config.toml's data.path); an error, before
    anything is written, when it is not here: an export without its tokenizer cannot generate text."""
    try:
        return run_tokenizer(checkpoint)
    except (FileNotFoundError, DataError) as error:
        raise FileNotFoundError(f"{error}; give the tokenizer to export with --tokenizer") from None


def export_tokenizer(source: Path, out: Path, vocab_size: int) -> tuple[dict[str, int | None], str]:
    """Write the tokenizer at `source` into `out` for transformers, if it fits the model's `vocab_size`; returns its
    special token ids (for config.json) and a note saying what was done."""
    tokenizer = load_tokenizer(source)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer {source} has {tokenizer.vocab_size} tokens, the model only {vocab_size}: give the "
                         "tokenizer the model was trained with (--tokenizer)")
    if not isinstance(tokenizer, SentencePieceTokenizer):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(source))  # a folder or a hub name
        note = f"tokenizer: {source}"
    else:
        hf = converted_sentencepiece(tokenizer)
        note = f"tokenizer: {tokenizer.model_file} converted to tokenizer.json (the same ids)"
        if hf is None:
            tokenizer.save(out)
            processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.model_file))
            return ({"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": _id(processor.pad_id())},
                    f"tokenizer: transformers cannot reproduce {tokenizer.model_file}'s ids, copied it as tokenizer.model "
                    f"(load it with sentencepiece, and put id {tokenizer.eos_id} before each prompt, as training did)")
    note += save_as_trained(hf, out, tokenizer.eos_id)
    return {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id}, note


def save_as_trained(hf: PreTrainedTokenizerFast, out: Path, eos_id: int) -> str:
    """Save `hf` into `out` to tokenize as the trainer did: each text preceded by the end-of-text token (training puts
    it before every document; here it is also the BOS), and special tokens' names in a text read as text. Returns
    the note's end."""
    eos = hf.convert_ids_to_tokens(eos_id)
    backend = getattr(hf, "backend_tokenizer", None)  # a slow tokenizer has none
    if backend is not None:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, eos_id)])
        hf.bos_token = hf.eos_token = eos
    hf.save_pretrained(out)
    settings = out / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "split_special_tokens": True}, indent=2))
    return f", each text preceded by {eos} as in training" if backend is not None else \
        f" (a slow tokenizer: put {eos} before each prompt, as training did)"


def converted_sentencepiece(tokenizer: SentencePieceTokenizer) -> PreTrainedTokenizerFast | None:
    """transformers' fast tokenizer made from the sentencepiece model, or None unless it gives the same ids on PROBES."""
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as folder:  # transformers converts a folder that holds only tokenizer.model
        tokenizer.save(Path(folder))
        try:
            hf = PreTrainedTokenizerFast.from_pretrained(folder)
        except Exception:  # noqa: BLE001 - whatever stops the conversion (an older transformers, no protobuf): copy instead
            return None
    same = all(hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text) for text in PROBES)
    return hf if same else None


def _id(sentencepiece_id: int) -> int | None:
    return sentencepiece_id if sentencepiece_id >= 0 else None


if __name__ == "__main__":
    main()

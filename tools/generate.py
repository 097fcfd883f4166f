"""Continue a prompt with a trained model, on one device, and print the continuation.

    python tools/generate.py runs/NAME --prompt "def fibonacci(" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0

The first argument is a checkpoint folder (config.toml + state.pt) or a run folder (its newest complete
checkpoint). The tokenizer is the one of the run's prepared data (data.path in its config, relative
to where training ran), or --tokenizer. As in the training data, the prompt starts a document:
[eos] + tokens(prompt); generation stops at the next eos.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from megassm.checkpoint import checkpoints_in
from megassm.config import Config, load_config
from megassm.data import DataError, TokenStream, Tokenizer, load_tokenizer
from megassm.generate import check_sampling, generate
from megassm.model import Mamba2LM

# Whatever layout trained it, the model runs here on one device, with the SSD backend that suits it.
ONE_DEVICE = ["--parallel.tp=1", "--parallel.cp=1", "--parallel.dp=1", "--parallel.sequence_parallel=false", "--model.ssd_backend=auto"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def find_checkpoint(path: Path) -> Path:
    """path itself if it holds state.pt, else the newest complete checkpoint of the run folder path."""
    if (path / "state.pt").is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise FileNotFoundError(f"{path}: no state.pt there and no complete checkpoint under {path / 'checkpoints'}: "
                                "give a checkpoint folder (checkpoints/step_N) or the run folder that holds them")
    return found[-1]


def load_model(checkpoint: Path, device: torch.device, dtype: torch.dtype) -> tuple[Mamba2LM, Config]:
    """The checkpoint's model in eval mode on device, and its run config."""
    config_file, state_file = checkpoint / "config.toml", checkpoint / "state.pt"
    for needed in (config_file, state_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found: {checkpoint} is not a complete checkpoint")
    cfg = load_config(config_file, ONE_DEVICE)
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = Mamba2LM(cfg.model)
    saved = torch.load(state_file, map_location="cpu", mmap=True, weights_only=True)["model"]  # mmap: the optimizer state stays unread
    expected = model.state_dict()
    wrong = sorted(name for name in expected.keys() | saved.keys() if name not in saved or name not in expected or saved[name].shape != expected[name].shape)
    if wrong:
        raise ValueError(f"{state_file} does not fit the model of {config_file} ({', '.join(wrong[:4])} ...): was it written for another model config?")
    model.load_state_dict(saved, assign=True)
    return model.to(device, dtype).eval(), cfg


def tokenizer_of(cfg: Config, override: str | None) -> Tokenizer:
    """--tokenizer, else the tokenizer of the run's prepared data folder."""
    if override is not None:
        return load_tokenizer(override)
    try:
        return load_tokenizer(TokenStream(cfg.data.path).tokenizer_path)
    except DataError as error:
        raise DataError(f"{error} (or give the tokenizer with --tokenizer)") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_OR_RUN_DIR")
    parser.add_argument("--prompt", default="", help="the start of the document to continue (default: empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this probability (1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the weights' precision (the SSM state stays fp32)")
    parser.add_argument("--tokenizer", help="a tokenizer folder or .model file (default: the one of the run's data)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("generate: --device cuda, but torch sees no CUDA device: use --device cpu")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
        checkpoint = find_checkpoint(args.checkpoint)
        model, cfg = load_model(checkpoint, device, DTYPES[args.dtype])
        tokenizer = tokenizer_of(cfg, args.tokenizer)
    except (OSError, ValueError) as error:  # missing files, a bad config (ConfigError) or data folder (DataError)
        sys.exit(f"generate: {error}")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        sys.exit(f"generate: the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.model.vocab_size}: "
                 "give the tokenizer the model was trained with (--tokenizer)")
    prompt = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(args.prompt)]], device=device)
    started = time.time()
    ids = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, tokenizer.eos_id,
                   torch.Generator(device).manual_seed(args.seed), tokenizer.vocab_size)
    new = ids[0, prompt.shape[1] :].tolist()
    print(tokenizer.decode(new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new))
    print(f"{len(new)} tokens in {time.time() - started:.1f} s from {checkpoint}", file=sys.stderr)


if __name__ == "__main__":
    main()

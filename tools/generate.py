"""Continue a prompt with a Mamba-2 or hybrid model on one device, and print the continuation.

    python tools/generate.py runs/NAME --prompt "def fibonacci(" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0

MODEL is a megassm checkpoint (checkpoints/step_N), a run folder (its newest checkpoint whose files are
all there: a damaged newer one is skipped), or a transformers (Mamba2, NemotronH, Bamba) or mamba-ssm
folder. The tokenizer is --tokenizer, else the one of the data the run trained on (data.path in the checkpoint's config.toml),
else the model folder's own. As in the training data, the prompt starts a document: [eos] + tokens(prompt); generation stops at
the next eos.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NoReturn
from pathlib import Path

import torch

from megassm.data import Tokenizer, load_tokenizer
from megassm.errors import exit_on_user_error
from megassm.generate import check_sampling, generate
from megassm.model import Mamba2LM, apply_kernels
from megassm.pretrained import MEGASSM, WEIGHT_DTYPES, detect_format, load_pretrained, newest_readable_checkpoint, run_tokenizer



def load_model(path: Path, device: torch.device, dtype: torch.dtype) -> Mamba2LM:
    """The model in `path` (any format megassm.pretrained reads), in eval mode on device."""
    cfg, state = load_pretrained(path)
    # The prompt goes through the PyTorch SSD, eagerly: on an H100 the Triton kernels' autotuning took ~25 s
    # per process, longer than a short prompt's whole generation, and torch.compile would recompile per length.
    with torch.device("meta"):  # no random init: every weight comes from the folder
        model = Mamba2LM(cfg)
    apply_kernels(model, "torch")
    model.load_state_dict(state, assign=True)
    return model.to(device, dtype).eval()


def model_folder(path: Path) -> Path:
    """The folder to read: a run folder's newest complete checkpoint, else `path` itself."""
    return newest_readable_checkpoint(path) if detect_format(path) == MEGASSM else path


def tokenizer_for(path: Path, given: str | None) -> Tokenizer:
    """--tokenizer, else the run's (megassm) or the folder's own (transformers, mamba-ssm)."""
    if given is not None:
        return load_tokenizer(given)
    fmt = detect_format(path)
    try:
        return load_tokenizer(run_tokenizer(path) if fmt == MEGASSM else path)
    except (OSError, ValueError) as error:  # ValueError: DataError
        raise FileNotFoundError(f"{error}; or give the model's tokenizer with --tokenizer") from None


def stop(message: str) -> NoReturn:
    """A user's mistake: one line, exit status 2 (as the trainer's)."""
    exit_on_user_error(__file__, message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, metavar="MODEL")
    parser.add_argument("--prompt", default="", help="the start of the document to continue (default: empty)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this probability (1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=WEIGHT_DTYPES, default="fp32", help="the weights' precision (the SSM state stays fp32)")
    parser.add_argument("--tokenizer", help="a tokenizer folder, .model file or hub name (default: see above)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        stop(f"--device {args.device}: give cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        stop(f"--device {args.device}: give cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        stop("--device cuda, but torch sees no CUDA device: use --device cpu")
    if not -(2**63) <= args.seed < 2**64:
        stop(f"--seed must be within [-2^63, 2^64), got {args.seed}")
    try:
        args.prompt.encode()
    except UnicodeEncodeError:  # bytes the terminal's locale could not decode, kept as surrogates
        stop(f"--prompt {args.prompt.encode(errors='backslashreplace').decode()} is not UTF-8 text: give the prompt in UTF-8")
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
        folder = model_folder(args.model)
        tokenizer = tokenizer_for(folder, args.tokenizer)
        model = load_model(folder, device, WEIGHT_DTYPES[args.dtype])
    except (OSError, ValueError) as error:  # missing or unreadable files (PretrainedError is a ValueError)
        stop(str(error))
    if tokenizer.vocab_size > model.cfg.vocab_size:
        stop(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.cfg.vocab_size}: "
             "give the tokenizer the model was trained with (--tokenizer)")
    prompt = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(args.prompt)]], device=device)
    started = time.time()
    ids = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, tokenizer.eos_id,
                   torch.Generator(device).manual_seed(args.seed), tokenizer.vocab_size)
    new = ids[0, prompt.shape[1] :].tolist()
    text = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    print(tokenizer.decode(text))
    print(f"{len(text)} tokens{' and eos' if len(text) < len(new) else ''} in {time.time() - started:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

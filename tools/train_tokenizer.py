"""Train a sentencepiece tokenizer (byte fallback: any text encodes; exact round trip) on documents.

    python tools/train_tokenizer.py --input data/builtin.jsonl --vocab-size 512 --out data/tokenizer

Inputs are read like tools/prepare_data.py reads them (.txt, .jsonl, .parquet files, folders, globs).
The folder written holds tokenizer.model; give it to prepare_data.py --tokenizer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from megassm.data import load_tokenizer, train_sentencepiece
from megassm.data.tokenizer import MAX_SENTENCES, MIN_VOCAB_SIZE
from megassm.data.prepare import iter_texts, load_documents, sample_documents
from megassm.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or globs of documents")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, 256 byte pieces and unk/bos/eos included")
    parser.add_argument("--out", required=True, help="folder to write tokenizer.model into")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--text-key", default="text", help="the text field of JSON / parquet records (default: text)")
    parser.add_argument("--max-sentences", type=int, default=MAX_SENTENCES,
                        help="train on at most this many lines, sampled from documents chosen at random")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out, a tokenizer's folder (its files)")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        exit_on_user_error(__file__, f"--vocab-size {args.vocab_size}: at least {MIN_VOCAB_SIZE} (256 byte pieces, unk, bos, eos and one "
                           "learned piece)")
    if args.max_sentences < 1:
        exit_on_user_error(__file__, f"--max-sentences {args.max_sentences}: train on at least one line")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        exit_on_user_error(__file__, f"--out {out} is a file: name a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        exit_on_user_error(__file__, f"--out {out} is not empty (a tokenizer of an earlier training?): choose another folder, or pass "
                           "--overwrite to replace it")
    if out.is_dir() and any(entry.is_dir() for entry in out.iterdir()):
        exit_on_user_error(__file__, f"--out {out} holds folders, as no tokenizer's folder does (a data or run folder?): choose another")
    started = time.time()
    training = out.with_name(f".{out.name}.training")  # replaces --out once trained: no mix with an earlier tokenizer's files
    shutil.rmtree(training, ignore_errors=True)
    try:
        documents = sample_documents(load_documents(args.input, args.text_key, num_proc=os.cpu_count()), args.max_sentences)
        train_sentencepiece(iter_texts(documents), args.vocab_size, training, args.model_type, args.max_sentences)
    except (OSError, ValueError) as error:  # missing inputs, no text field, too small a corpus for the vocabulary
        exit_on_user_error(__file__, str(error))
    shutil.rmtree(out, ignore_errors=True)
    training.rename(out)
    tokenizer = load_tokenizer(out)
    print(f"trained a {tokenizer.vocab_size}-piece {args.model_type} tokenizer (eos id {tokenizer.eos_id}) on "
          f"{len(documents)} documents in {time.time() - started:.1f} s: {out}")


if __name__ == "__main__":
    main()

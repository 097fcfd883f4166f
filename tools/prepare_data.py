"""Tokenize documents into a prepared data folder: packed token shards, document index, tokenizer copy.

    python tools/prepare_data.py --input data/builtin.jsonl --tokenizer data/tokenizer --out data/builtin --num-proc 2

--input: local .txt (a document per line, see --sample-by), .jsonl / .json (a "text" field per
line, see --text-key) or .parquet files, folders or globs, all of one kind; or one Hugging Face hub
dataset name. --tokenizer: a folder made by tools/train_tokenizer.py, a sentencepiece .model file,
a Hugging Face tokenizer folder or hub name. --val-fraction of the documents, spread evenly
over them, become the validation split. Point the trainer's data.path at --out.
"""

from __future__ import annotations

import argparse
import os
import time

from megassm.data import TokenStream
from megassm.data.prepare import SHARD_TOKENS, VAL_FRACTION, prepare
from megassm.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or globs of documents, or a hub dataset name")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder, .model file or hub name")
    parser.add_argument("--out", required=True, help="the data folder to create")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count(), help="reading and tokenizing processes (default: all cores)")
    parser.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file at most (default: 2^28)")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                        help=f"fraction of documents held out for validation (default: {VAL_FRACTION})")
    parser.add_argument("--text-key", default="text", help="the text field of JSON / parquet records (default: text)")
    parser.add_argument("--sample-by", choices=("line", "paragraph", "document"), default="line",
                        help=".txt inputs: a document per line, per blank-line-separated paragraph, or per file")
    parser.add_argument("--split", default="train", help="split of a hub dataset (default: train)")
    parser.add_argument("--cache-dir", help="datasets' copies of the documents and tokens, about twice the corpus, kept: a rerun "
                                            "after an interruption reuses them (default: in --out while it is prepared, deleted "
                                            "at the end)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier preparation in --out (a folder holding other files is refused)")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        out = prepare(args.input, args.tokenizer, args.out, text_key=args.text_key, num_proc=args.num_proc, shard_tokens=args.shard_tokens,
                      val_fraction=args.val_fraction, split=args.split, sample_by=args.sample_by, cache_dir=args.cache_dir,
                      overwrite=args.overwrite)
        meta = TokenStream(out).meta
    except (OSError, ValueError) as error:  # missing inputs or tokenizer, bad records, DataError
        exit_on_user_error(__file__, str(error))
    print(f"{out}: {meta.num_documents} documents, {meta.total_tokens} tokens ({meta.val_tokens} for validation) "
          f"in {len(meta.shards)} shard(s) of {meta.dtype}, vocabulary {meta.vocab_size}, in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()

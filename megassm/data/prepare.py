"""Documents -> a prepared data folder (format in megassm.data.shards).

`datasets` reads the documents (local text / JSON lines / parquet files, or a hub dataset) and
tokenizes them in parallel; with a cache folder of its own (--cache-dir), kept after the preparation, re-running an
interrupted preparation skips the tokenization `datasets` finished and cached there. Everything is written into
`<out>.partial` and renamed to `<out>` when complete: a folder named `<out>` is always a whole one, and one it
replaces is renamed away first, deleted once the new one is in place. Overwriting deletes only what a preparation
writes: a folder that holds anything else, or an input, is refused.
"""

from __future__ import annotations

import functools
import glob
import itertools
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from megassm.data.diagnose import first_problem, root_cause
from megassm.data.shards import (
    CACHE_DIR,
    DOC_STARTS_FILE,
    TOKENIZER_DIR,
    DataError,
    Meta,
    Shard,
    ShardWriter,
    file_sha256,
    folder_sha256,
    token_dtype,
    tokenizer_files,
    written_by_preparation,
)
from megassm.data.tokenizer import Tokenizer, is_hub_name, load_tokenizer

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")  # read through by datasets
GLOB_CHARS = "*?["
TEXT_FEATURES = (datasets.Value("string"), datasets.Value("large_string"))
SHARD_TOKENS = 2**28  # tokens per shard file at most
VAL_FRACTION = 0.005  # the share of documents held out for validation


def _builder(file: Path) -> str | None:
    """The datasets builder for a file, from its extension (a compression suffix is looked through)."""
    suffixes = [s.lower() for s in file.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _local_files(pattern: str) -> list[Path]:
    """The files one input names: itself, the data files below a folder (not in hidden folders, .ipynb_checkpoints or
    .git: as a glob's ** and datasets skip them), or a glob's matches (sorted)."""
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.rglob("*")
                      if p.is_file() and _builder(p) and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if any(c in pattern for c in GLOB_CHARS):
        return [Path(p) for p in sorted(glob.glob(pattern, recursive=True)) if Path(p).is_file()]
    return [path] if path.is_file() else []


def _input_list(inputs: str | Path | Sequence[str | Path]) -> list[str]:
    return [str(inputs)] if isinstance(inputs, (str, Path)) else [str(i) for i in inputs]


def load_documents(
    inputs: str | Path | Sequence[str | Path],
    text_key: str = "text",
    split: str = "train",
    sample_by: str = "line",
    cache_dir: str | Path | None = None,
    num_proc: int = 1,
) -> datasets.Dataset:
    """The documents as a Dataset with one column, "text", in input order, read by `num_proc` processes.

    `inputs`: local files, folders or globs, all of one kind (.txt: a document per line, or per
    paragraph / file with sample_by="paragraph" | "document"; .json/.jsonl: one object per line with
    a `text_key` field; .parquet: a `text_key` column), or one Hugging Face hub dataset name."""
    inputs = _input_list(inputs)
    matches = {pattern: _local_files(pattern) for pattern in inputs}
    cache, workers = None if cache_dir is None else str(cache_dir), num_proc if num_proc > 1 else None
    files, builder = [], None  # local files and their datasets builder; none for a hub dataset
    if len(inputs) == 1 and not Path(inputs[0]).exists() and is_hub_name(inputs[0]):
        documents = datasets.load_dataset(inputs[0], split=split, cache_dir=cache, num_proc=workers)
    else:
        missing = [pattern for pattern, files in matches.items() if not files]
        if missing:
            raise FileNotFoundError(f"input {missing[0]}: no such file, no data files in that folder, or no glob match")
        builders = {file: _builder(file) for files in matches.values() for file in files}
        unknown = [file for file, builder in builders.items() if builder is None]
        if unknown:
            raise DataError(f"input {unknown[0]}: unknown kind of file; use .txt, .jsonl (or .json) or .parquet")
        if len(set(builders.values())) > 1:
            raise DataError(f"inputs mix {' and '.join(sorted(set(builders.values())))} files; prepare one kind at a time")
        files, builder = list(builders), next(iter(builders.values()))
        documents = _load_local(files, builder, text_key, sample_by, cache, workers)
    if text_key not in documents.column_names:
        raise DataError(f"inputs {' '.join(inputs)} have no {text_key!r} field (they have {', '.join(documents.column_names)}): "
                        "name the text field with --text-key")
    feature = documents.features[text_key]
    if feature not in TEXT_FEATURES:
        located = first_problem(files, builder, text_key) if files else None
        raise DataError(located or f"the {text_key!r} field of inputs {' '.join(inputs)} holds {getattr(feature, 'dtype', feature)}, "
                                   "not text: name the text field with --text-key")
    documents = documents.select_columns([text_key])
    return documents if text_key == "text" else documents.rename_column(text_key, "text")


def _load_local(files: list[Path], builder: str, text_key: str, sample_by: str, cache: str | None,
                workers: int | None) -> datasets.Dataset:
    """The files through datasets' `builder`; a file datasets cannot read is a DataError naming it (and the line)."""
    options = {"sample_by": sample_by} if builder == "text" else {}
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its log of a bad record would repeat the line below, less clearly
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache, num_proc=workers,
                                     **options)
    except Exception as error:  # noqa: BLE001 -- datasets wraps a bad record in errors of its own, naming no file
        problem = first_problem(files, builder, text_key)
        if problem is None:
            problem = f"datasets cannot read {files[0]}{' (or another input)' if len(files) > 1 else ''}: {root_cause(error)}"
        raise DataError(problem) from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def iter_texts(documents: datasets.Dataset) -> Iterator[str]:
    """The texts of load_documents' result, read a batch at a time (not all in memory)."""
    for batch in documents.iter(batch_size=1000):
        yield from batch["text"]


def sample_documents(documents: datasets.Dataset, lines: int) -> datasets.Dataset:
    """Documents chosen at random (the same ones every time), in their order, holding about twice `lines` lines (as many
    per document as the first thousand hold): enough for a tokenizer trained on `lines` sampled lines, without reading a
    large corpus whole."""
    head = documents.select(range(min(len(documents), 1000)))["text"]
    per_document = max(1.0, sum(text.count("\n") + 1 for text in head if text) / max(1, len(head)))
    wanted = math.ceil(2 * lines / per_document)
    if wanted >= len(documents):
        return documents
    return documents.select(np.sort(np.random.default_rng(0).choice(len(documents), wanted, replace=False)))


@functools.lru_cache(maxsize=1)
def _worker_tokenizer(path: str, digest: str) -> Tokenizer:
    """Loaded once per process; keyed on the digest too, as a later preparation may put another
    tokenizer at the same path."""
    return load_tokenizer(path)


@dataclass(frozen=True)
class _Tokenize:
    """The map function. It carries only the tokenizer's path (each worker process loads it once) and
    the digest of its files, so that datasets' cache of the results is keyed on the tokenizer's content."""

    tokenizer: str
    digest: str

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        tokenizer = _worker_tokenizer(self.tokenizer, self.digest)
        dtype = token_dtype(tokenizer.vocab_size)
        texts = [text for text in batch["text"] if text]  # empty documents (blank lines of .txt files) are dropped
        ids = [np.array([tokenizer.eos_id, *doc], dtype=dtype) for doc in tokenizer.encode_batch(texts)]
        return {"ids": ids, "length": [len(doc) for doc in ids]}


def _tokenize(documents: datasets.Dataset, tokenizer_dir: Path, num_proc: int) -> datasets.Dataset:
    """Columns "ids" ([eos] + tokens of each non-empty document, in the token dtype) and "length"."""
    tokenize = _Tokenize(str(tokenizer_dir.resolve()), folder_sha256(tokenizer_dir))
    return documents.map(tokenize, batched=True, remove_columns=["text"], num_proc=num_proc if num_proc > 1 else None, desc="tokenizing")


def _write_shards(tokens: datasets.Dataset, folder: Path, dtype: np.dtype, shard_tokens: int, total: int,
                  held_out: np.ndarray) -> list[Shard]:
    """The documents in their order but those `held_out`, then those (the validation split, at the stream's end)."""
    kept = np.ones(len(tokens), dtype=bool)
    kept[held_out] = False
    batch = 1000
    with ShardWriter(folder, dtype, shard_tokens) as writer, tqdm(total=total, unit="tok", unit_scale=True, desc="writing shards") as bar:
        tables = (table.filter(pa.array(kept[i * batch:(i + 1) * batch]))
                  for i, table in enumerate(tokens.with_format("arrow").iter(batch_size=batch)))
        for table in itertools.chain(tables, tokens.select(held_out).with_format("arrow").iter(batch_size=batch)):
            stream = table.column("ids").combine_chunks().flatten().to_numpy()
            writer.write(stream)
            bar.update(len(stream))
    return writer.shards


def _validation_documents(num_documents: int, val_fraction: float) -> np.ndarray:
    """val_fraction of the documents, spread evenly over them (inputs often come grouped by source), at least one when
    there are two or more (none if 0)."""
    if val_fraction <= 0 or num_documents < 2:
        return np.zeros(0, dtype=np.int64)
    count = min(num_documents - 1, max(1, round(num_documents * val_fraction)))
    return np.linspace(0, num_documents - 1, count).round().astype(np.int64)


def _check_replaceable(out: Path, partial: Path, replaced: Path, inputs: list[str]) -> None:
    """DataError unless replacing `out`, `partial` and `replaced` loses nothing: they hold only what a preparation
    writes, and no input (documents or tokenizer) is one of them or lies inside them."""
    existing = [folder for folder in (out, partial, replaced) if folder.exists()]
    if not existing:
        return
    for folder in existing:
        if not folder.is_dir():
            raise DataError(f"{folder} is a file, not a data folder: choose another --out")
        foreign = sorted(p.name for p in folder.iterdir() if not written_by_preparation(p.name))
        if foreign:
            raise DataError(f"{folder} holds files that prepare_data.py did not write ({', '.join(foreign[:3])}"
                            f"{' ...' if len(foreign) > 3 else ''}): choose another --out or move them away")
    read = [path.resolve() for pattern in inputs for path in [Path(pattern), *_local_files(pattern)] if path.exists()]
    for folder in existing:
        inside = [path for path in read if path.is_relative_to(folder.resolve())]
        if inside:
            raise DataError(f"the input {inside[0]} is inside {folder}, which --overwrite would replace: choose an --out "
                            "outside the inputs and the tokenizer")


def _remove_preparation(folder: Path) -> None:
    """Delete a folder that _check_replaceable accepted: its entries (all a preparation's own), then itself."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    folder.rmdir()


def prepare(
    inputs: str | Path | Sequence[str | Path],
    tokenizer: str | Path,
    out: str | Path,
    *,
    text_key: str = "text",
    num_proc: int = 1,
    shard_tokens: int = SHARD_TOKENS,
    val_fraction: float = VAL_FRACTION,
    split: str = "train",
    sample_by: str = "line",
    cache_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Tokenize `inputs` (see load_documents) with `tokenizer` (see load_tokenizer) into the data
    folder `out`, reading and tokenizing in `num_proc` processes; returns out. `val_fraction` of the documents, spread
    evenly over them, become the validation split, written after the others. `overwrite`: replace an earlier preparation in `out`.
    datasets' copies of the documents and tokens (as large as the corpus, twice) go to `cache_dir`, or where none is
    given into the preparation's own folder, deleted when it is done."""
    out, inputs = Path(out), _input_list(inputs)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another output folder or pass --overwrite")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or num_proc < 1:
        raise ValueError(f"shard_tokens = {shard_tokens} and num_proc = {num_proc} must be at least 1")
    partial, replaced = out.with_name(out.name + ".partial"), out.with_name(out.name + ".replaced")
    _check_replaceable(out, partial, replaced, [*inputs, str(tokenizer)])
    tok = load_tokenizer(tokenizer)
    for left in (partial, replaced):  # by an interrupted run
        if left.exists():
            _remove_preparation(left)
    partial.mkdir(parents=True)
    try:
        documents = load_documents(inputs, text_key, split, sample_by, cache_dir or partial / CACHE_DIR, num_proc)
        tok.save(partial / TOKENIZER_DIR)
        tokens = _tokenize(documents, partial / TOKENIZER_DIR, num_proc)
        lengths = tokens.data.column("length").to_numpy()
        if len(lengths) == 0:
            raise DataError(f"inputs {' '.join(inputs)} hold no non-empty documents")
        dtype, total = token_dtype(tok.vocab_size), int(lengths.sum())
        held_out = _validation_documents(len(lengths), val_fraction)
        shards = _write_shards(tokens, partial, dtype, shard_tokens, total, held_out)
        written = np.concatenate([np.delete(lengths, held_out), lengths[held_out]])
        np.save(partial / DOC_STARTS_FILE, np.concatenate([[0], np.cumsum(written[:-1])]).astype(np.int64))
        Meta(
            vocab_size=tok.vocab_size, eos_id=tok.eos_id, dtype=dtype.name, shards=shards, total_tokens=total,
            num_documents=len(lengths), val_tokens=int(lengths[held_out].sum()), doc_starts_sha256=file_sha256(partial / DOC_STARTS_FILE),
            tokenizer_sha256={name: file_sha256(partial / TOKENIZER_DIR / name) for name in tokenizer_files(partial / TOKENIZER_DIR)},
            source={"inputs": inputs, "text_key": text_key, "tokenizer": str(tokenizer)},
        ).write(partial)
        shutil.rmtree(partial / CACHE_DIR, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():  # renamed away, not deleted, until the new folder is in place
        out.rename(replaced)
    partial.rename(out)
    if replaced.exists():
        _remove_preparation(replaced)
    return out

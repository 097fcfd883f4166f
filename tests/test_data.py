"""The data pipeline against independent references: tokenizers, the built-in corpus, documents ->
shards (decoded back), the sample order, DP / CP slicing, seq_idx, bad folders and the CLIs."""

import datetime
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megassm.data import DataError, SampleLoader, TokenStream, load_tokenizer, rank_samples, train_sentencepiece, write_builtin_corpus
from megassm.data.loader import permute
from megassm.data.prepare import load_documents, prepare
from megassm.data.shards import Meta, ShardWriter, token_dtype
from megassm.data.tokenizer import HFTokenizer, SentencePieceTokenizer, is_hub_name
from tests.commands import run_tool
from tests.distributed import run_distributed

SHARD_TOKENS = 97  # tiny, so that documents and samples cross shard edges
VAL_FRACTION = 0.05
TRICKY = ["  indented\n\tline\n\n", "ünïcödé ß 中文 🙂", "x = 1_000_000  # spaces  kept ", ""]


def make_documents(count: int = 160) -> list[str]:
    """Deterministic documents of words, unicode, digits, newlines and runs of spaces; one is empty."""
    rng = np.random.default_rng(0)
    words = ["the", "stream", "token", "shard", "mamba", "state", "def", "return", "x = 1", "42", "é", "中文", "🙂", "\n", "\t", "  "]
    documents = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(count)]
    documents[7] = ""  # dropped by the preparation
    return documents + TRICKY[:3]


DOCUMENTS = make_documents()


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def sp_dir(workdir) -> Path:
    return train_sentencepiece(DOCUMENTS * 3, vocab_size=300, out_dir=workdir / "sp")


@pytest.fixture(scope="module")
def prepared(workdir, sp_dir) -> Path:
    inputs = write_jsonl(workdir / "docs.jsonl", DOCUMENTS)
    return prepare([inputs], sp_dir, workdir / "prepared", num_proc=2, shard_tokens=SHARD_TOKENS, val_fraction=VAL_FRACTION,
                   cache_dir=workdir / "cache")


@pytest.fixture(scope="module")
def stream(prepared) -> TokenStream:
    return TokenStream(prepared)


def written_order(texts: list[str], val_fraction: float = VAL_FRACTION) -> tuple[list[str], int]:
    """The non-empty documents as a preparation writes them, and how many of them (the last) are the validation split:
    in order but every k-th, spread evenly from the first to the last, which follow."""
    texts = [t for t in texts if t]
    val = set(np.linspace(0, len(texts) - 1, round(len(texts) * val_fraction)).round().astype(int).tolist())
    return [t for i, t in enumerate(texts) if i not in val] + [texts[i] for i in sorted(val)], len(val)


def reference_stream(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The packed stream and document starts computed naively: [eos] + encode(doc), the documents in written order."""
    pieces = [[tokenizer.eos_id] + tokenizer.encode(t) for t in written_order(texts)[0]]
    return np.array([i for p in pieces for i in p]), np.cumsum([0] + [len(p) for p in pieces[:-1]])


# ---------------------------------------------------------------------------------------------- tokenizers


def test_sentencepiece_round_trip(sp_dir, tmp_path):
    for tok in (load_tokenizer(sp_dir), load_tokenizer(sp_dir / "tokenizer.model")):
        assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 300 and tok.eos_id == 2
        for text in TRICKY + DOCUMENTS[:20]:
            ids = tok.encode(text)
            assert tok.decode(ids) == text and all(0 <= i < tok.vocab_size for i in ids) and tok.eos_id not in ids
        assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode(TRICKY[1]) == tok.encode(TRICKY[1])


def make_hf_tokenizer(folder: Path) -> Path:
    """A byte-level BPE trained here with `tokenizers`, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(DOCUMENTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def test_hf_tokenizer_through_load_tokenizer(workdir):
    from tokenizers import Tokenizer

    folder = make_hf_tokenizer(workdir / "hf")
    tok = load_tokenizer(folder)
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 0
    assert tok.vocab_size == Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size() > 256
    for text in [*TRICKY, *DOCUMENTS[:20], "a document that writes <|endoftext|>, the EOS token's text"]:
        ids = tok.encode(text)  # a special token's text in a document is text, not the token: no EOS inside a document
        assert tok.decode(ids) == text and tok.eos_id not in ids and max(ids, default=0) < tok.vocab_size


def test_missing_tokenizer_says_how_to_make_one(tmp_path, monkeypatch):
    for path in (tmp_path / "nothing", tmp_path):  # neither exists nor holds a tokenizer
        with pytest.raises(FileNotFoundError, match=f"{path}.*tools/train_tokenizer.py"):
            load_tokenizer(path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert is_hub_name("state-spaces/mamba2-130m") and is_hub_name("gpt2")
    assert not is_hub_name("data/tokenizer") and not is_hub_name("corpus.jsonl") and not is_hub_name("/abs/path")


# ---------------------------------------------------------------------------------------------- corpus


def test_builtin_corpus_is_deterministic_and_leaks_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGASSM_CANARY", "canary-1f2e3d")  # cgi.test's default argument is os.environ
    first = write_builtin_corpus(tmp_path / "a.jsonl").read_bytes()
    assert write_builtin_corpus(tmp_path / "b.jsonl").read_bytes() == first
    texts = [json.loads(line)["text"] for line in first.decode().splitlines()]
    assert len(texts) > 300 and 1 < len(first) / 2**20 < 8 and all(texts)
    assert any(t.startswith("Module json\n") for t in texts)
    assert not any("canary-1f2e3d" in t or str(tmp_path) in t or " at 0x" in t for t in texts)
    assert len(write_builtin_corpus(tmp_path / "c.jsonl", max_documents=3).read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------- preparation


def test_packed_stream_matches_documents(prepared, stream, sp_dir):
    tokens, starts = reference_stream(load_tokenizer(sp_dir), DOCUMENTS)
    assert np.array_equal(stream.read(0, len(stream)), tokens)
    raw = np.concatenate([np.fromfile(prepared / f"tokens_{i:05d}.bin", dtype="<u2") for i in range(len(stream.meta.shards))])
    assert np.array_equal(raw, tokens)  # the files themselves, not only the reader
    assert np.array_equal(stream.doc_starts, starts)
    meta = stream.meta
    assert (meta.dtype, meta.vocab_size, meta.eos_id, meta.num_documents) == ("uint16", 300, 2, len(starts))
    assert len(meta.shards) == math.ceil(len(tokens) / SHARD_TOKENS)
    assert all(s.tokens == SHARD_TOKENS for s in meta.shards[:-1])
    texts, n_val = written_order(DOCUMENTS)
    assert 1 < n_val < len(texts) // 10 and meta.val_tokens == len(tokens) - starts[-n_val]
    copy = load_tokenizer(stream.tokenizer_path)  # the folder's own tokenizer decodes it
    ends = list(starts[1:]) + [len(tokens)]
    assert [copy.decode(stream.read(s + 1, e - s - 1)) for s, e in zip(starts, ends, strict=True)] == texts
    stream.verify()


def test_reads_across_shard_edges(stream):
    full = stream.read(0, len(stream))
    at_edges = [(k * SHARD_TOKENS + d, n) for k in range(1, 4) for d in (-1, 0, 1) for n in (0, 1, 2, SHARD_TOKENS, 3 * SHARD_TOKENS)]
    rng = np.random.default_rng(1)
    anywhere = [(int(rng.integers(0, len(full) - 400)), int(rng.integers(0, 400))) for _ in range(50)]
    for start, length in at_edges + anywhere:
        assert np.array_equal(stream.read(start, length), full[start : start + length])
    with pytest.raises(IndexError):
        stream.read(len(stream) - 1, 2)


def test_hf_tokenizer_prepares_the_same_way(workdir):
    tok_dir = make_hf_tokenizer(workdir / "hf-prep")
    out = prepare([write_jsonl(workdir / "hf.jsonl", DOCUMENTS)], tok_dir, workdir / "hf-prepared", cache_dir=workdir / "cache",
                  val_fraction=VAL_FRACTION)
    tokens, starts = reference_stream(load_tokenizer(tok_dir), DOCUMENTS)
    stream = TokenStream(out)
    assert np.array_equal(stream.read(0, len(stream)), tokens) and np.array_equal(stream.doc_starts, starts)
    assert isinstance(load_tokenizer(stream.tokenizer_path), HFTokenizer)


@pytest.mark.parametrize("eos_id, dtype", [(5000, "uint16"), (70000, "uint32")])
def test_an_hf_tokenizer_whose_ids_leave_gaps_is_counted_to_its_largest_id(tmp_path, eos_id, dtype):
    """len() of a transformers tokenizer counts its entries: ids past it would overflow the shards' dtype or be
    taken as outside the vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2, "</s>": eos_id}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").vocab_size == eos_id + 1
    stream = TokenStream(prepare([write_jsonl(tmp_path / "ab.jsonl", ["a b a"] * 10)], tmp_path / "tok", tmp_path / "out",
                                 cache_dir=tmp_path / "cache", val_fraction=0.0))
    assert (stream.meta.vocab_size, stream.meta.dtype) == (eos_id + 1, dtype)
    assert stream.read(0, 8).tolist() == [eos_id, 1, 2, 1, eos_id, 1, 2, 1]


def test_a_tokenizer_that_cannot_be_trained_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError, match="sentencepiece training failed: .*Vocabulary size"):
        train_sentencepiece(DOCUMENTS, 100_000, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_retrained_tokenizer_is_not_served_from_the_tokenization_cache(tmp_path):
    inputs, tok_dir, cache = [write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)], tmp_path / "tok", tmp_path / "cache"
    for vocab_size in (320, 300):  # same paths, same cache: only the tokenizer's content differs
        train_sentencepiece(DOCUMENTS, vocab_size, tok_dir)
        stream = TokenStream(prepare(inputs, tok_dir, tmp_path / "out", cache_dir=cache, overwrite=True, val_fraction=VAL_FRACTION))
        assert np.array_equal(stream.read(0, len(stream)), reference_stream(load_tokenizer(tok_dir), DOCUMENTS)[0])
        assert stream.meta.vocab_size == vocab_size


def test_reads_txt_jsonl_parquet_folders_and_globs(tmp_path):
    texts = [t.replace("\n", " ") for t in DOCUMENTS if t]  # .txt holds a document per line
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n".join(texts[:50]) + "\n")
    (tmp_path / "txt" / "b.txt").write_text("\n".join(texts[50:]) + "\n")
    (tmp_path / "txt" / ".ipynb_checkpoints").mkdir()  # a notebook's copy of a.txt: not a document of the folder
    shutil.copy(tmp_path / "txt" / "a.txt", tmp_path / "txt" / ".ipynb_checkpoints" / "a-checkpoint.txt")
    write_jsonl(tmp_path / "docs.jsonl", texts, key="body")
    pq.write_table(pa.table({"body": texts, "n": list(range(len(texts)))}), tmp_path / "docs.parquet")
    cache = tmp_path / "cache"
    for inputs, key in [([tmp_path / "txt"], "text"), ([tmp_path / "txt" / "*.txt"], "text"),
                        ([tmp_path / "docs.jsonl"], "body"), ([tmp_path / "docs.parquet"], "body")]:
        documents = load_documents(inputs, text_key=key, cache_dir=cache)
        assert documents.column_names == ["text"] and documents["text"][:] == texts, inputs
    with pytest.raises(DataError, match="no 'text' field.*--text-key"):
        load_documents([tmp_path / "docs.jsonl"], cache_dir=cache)
    with pytest.raises(DataError, match="mix"):
        load_documents([tmp_path / "docs.jsonl", tmp_path / "docs.parquet"], cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_documents([tmp_path / "missing.jsonl"], cache_dir=cache)


def test_interrupted_prepare_leaves_nothing(tmp_path, sp_dir, monkeypatch):
    inputs = [write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)]

    def fail(self, tokens):
        raise RuntimeError("killed")

    monkeypatch.setattr(ShardWriter, "write", fail)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(inputs, sp_dir, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "docs.jsonl"]
    monkeypatch.undo()
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare(inputs, sp_dir, tmp_path / "out", cache_dir=tmp_path / "cache")


def test_an_overwritten_preparation_stays_whole_until_the_new_one_is_in_place(tmp_path, sp_dir, monkeypatch):
    """Interrupted as the new folder takes its place, the old one is still whole (renamed aside); the next run
    replaces it and leaves nothing else behind."""
    inputs, out = [write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)], tmp_path / "out"
    old = TokenStream(prepare(inputs, sp_dir, out, cache_dir=tmp_path / "cache", val_fraction=0.0))
    rename = Path.rename

    def interrupted(self, target):
        if self.name == "out.partial":
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, sp_dir, out, cache_dir=tmp_path / "cache", overwrite=True)
    aside = TokenStream(tmp_path / "out.replaced")
    aside.verify()
    assert aside.meta == old.meta
    monkeypatch.undo()
    new = TokenStream(prepare(inputs, sp_dir, out, cache_dir=tmp_path / "cache", overwrite=True))
    assert new.meta.val_tokens > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "docs.jsonl", "out"]


def test_documents_without_text_do_not_stop_the_tokenizer_training(tmp_path):
    import datasets

    from megassm.data.prepare import sample_documents

    documents = datasets.Dataset.from_dict({"text": [None, *DOCUMENTS]})  # a JSON record with "text": null
    sample = sample_documents(documents, lines=10_000)["text"]
    train_sentencepiece(sample, 300, tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").vocab_size == 300


# ---------------------------------------------------------------------------------------------- bad folders


@pytest.fixture
def copy(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-2])


def flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file", [
    (lambda p: p.unlink(), "meta.json"),
    (lambda p: p.write_text("{\"version\": 1, "), "meta.json"),
    (lambda p: p.write_text(p.read_text().replace("vocab_size", "vocab")), "meta.json"),
    (lambda p: p.write_text(p.read_text().replace('"tokenizer": "tokenizer"', '"tokenizer": 5')), "meta.json"),
    (truncate, "tokens_00002.bin"),
    (lambda p: p.unlink(), "tokens_00001.bin"),
    (lambda p: p.unlink(), "doc_starts.npy"),
])
def test_damaged_folder_fails_on_open_naming_the_file(copy, damage, file):
    damage(copy / file)
    with pytest.raises(DataError, match=f"{copy / file}.*tools/prepare_data.py"):
        TokenStream(copy)


@pytest.mark.parametrize("file", ["tokens_00003.bin", "doc_starts.npy", "tokenizer/tokenizer.model"])
def test_flipped_byte_fails_verify_naming_the_file(copy, file):
    flip_byte(copy / file)
    stream = TokenStream(copy)  # same sizes: opening cannot tell
    with pytest.raises(DataError, match=f"{copy / file}.*sha256"):
        stream.verify()


def test_a_file_added_to_or_gone_from_the_tokenizer_fails_on_open(copy):
    """load_tokenizer would read an added tokenizer.json before the sentencepiece model the ids were made with."""
    (copy / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=f"^{copy / 'tokenizer'} holds other files than the tokenizer saved with the data "
                                        r"\(tokenizer.model\); .*tools/prepare_data.py"):
        TokenStream(copy)
    (copy / "tokenizer" / "tokenizer.json").unlink()
    (copy / "tokenizer" / "tokenizer.model").unlink()
    with pytest.raises(DataError, match="holds other files than the tokenizer saved with the data"):
        TokenStream(copy)
    (copy / "tokenizer").rmdir()
    TokenStream(copy)  # a tokenizer that is gone is the trainer's to name (it loads it), not a folder of other files


def test_a_tokenizer_table_of_another_shape_is_a_damaged_description(copy):
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "tokenizer_sha256": None}))
    with pytest.raises(DataError, match="tokenizer_sha256 is not a table of the tokenizer's files' sha256; .*tools/prepare_data.py"):
        TokenStream(copy)


def test_a_folder_prepared_without_tokenizer_checksums_opens_and_verifies(copy):
    meta = json.loads((copy / "meta.json").read_text())
    assert sorted(meta.pop("tokenizer_sha256")) == ["tokenizer.model"]
    (copy / "meta.json").write_text(json.dumps(meta))
    (copy / "verified.json").unlink(missing_ok=True)
    flip_byte(copy / "tokenizer" / "tokenizer.model")  # unchecked there
    stream = TokenStream(copy)
    assert stream.verify() and "tokenizer/tokenizer.model" not in json.loads((copy / "verified.json").read_text())


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'}.*prepare_data.py"):
        TokenStream(tmp_path / "nope")


def test_a_split_without_one_whole_sample_says_what_to_change(workdir, sp_dir, prepared, stream):
    no_val = prepare([workdir / "docs.jsonl"], sp_dir, workdir / "no-val", val_fraction=0, cache_dir=workdir / "cache")
    with pytest.raises(DataError, match=f"^the validation split of {no_val} is empty: prepare the data again with a --val-fraction above 0 "
                                        r".*, or set train.eval_every = 0 to train without validation$"):
        SampleLoader(TokenStream(no_val), seq_len=8, seed=0, split="val")
    val, train = stream.meta.val_tokens, len(stream) - stream.meta.val_tokens
    with pytest.raises(DataError, match=f"^data.seq_len = {val} needs at least {val + 1} tokens, but the validation split of {prepared} "
                                        f"has {val}: lower data.seq_len, prepare it again with a larger --val-fraction, or set "
                                        "train.eval_every = 0$"):
        SampleLoader(stream, seq_len=val, seed=0, split="val")
    with pytest.raises(DataError, match=f"^data.seq_len = {train} needs at least {train + 1} tokens, but the training split of {prepared} "
                                        f"has {train}: lower data.seq_len, or prepare more data$"):
        SampleLoader(stream, seq_len=train, seed=0, split="train")


# ---------------------------------------------------------------------------------------------- sample order


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection_per_seed_and_epoch(n):
    index = np.arange(n)
    orders = [permute(index, n, seed, np.full(n, epoch)) for seed in (0, 1) for epoch in (0, 1)]
    for order in orders:
        assert np.array_equal(np.sort(order), index)
    if n >= 64:
        assert len({tuple(o) for o in orders}) == len(orders)


def test_permutation_of_a_huge_range_needs_no_table():
    n = 10**12 + 39
    out = permute(np.arange(10**5), n, seed=3, epoch=np.zeros(10**5, np.int64))
    assert len(np.unique(out)) == 10**5 and out.min() >= 0 and out.max() < n and out.max() > n // 2


def test_order_covers_every_window_once_per_epoch_and_depends_only_on_seed_and_k(stream):
    loader = SampleLoader(stream, seq_len=16, seed=5)
    n = loader.num_windows
    starts = loader.window_starts(0, 3 * n)
    epochs = starts.reshape(3, n)
    for epoch in epochs:
        assert np.array_equal(np.sort(epoch), np.arange(n) * 16)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(SampleLoader(stream, seq_len=16, seed=6).window_starts(0, n), epochs[0])
    whole = loader.batch(n - 5, 10)  # crosses an epoch boundary
    for first in (n - 5, n - 2, n + 3):  # "resume at sample k": a fresh loader, nothing else
        part = SampleLoader(stream, seq_len=16, seed=5).batch(first, 2)
        assert torch.equal(part.input_ids, whole.input_ids[first - n + 5 : first - n + 7])


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_step_reads_the_same_samples_whatever_the_dp_size(stream, micro_batch):
    global_batch, loader = 8, SampleLoader(stream, seq_len=16, seed=0)
    for step in (0, 3):
        want = loader.batch(step * global_batch, global_batch).input_ids
        for dp in (1, 2, 4):
            firsts = [rank_samples(step * global_batch, m, d, dp, micro_batch, global_batch)
                      for d in range(dp) for m in range(global_batch // (dp * micro_batch))]
            samples = sorted(f + i for f in firsts for i in range(micro_batch))
            assert samples == list(range(step * global_batch, (step + 1) * global_batch))
            rows = torch.cat([loader.batch(f, micro_batch).input_ids for f in sorted(firsts)])
            assert torch.equal(rows, want)
    with pytest.raises(ValueError, match="data.global_batch"):
        rank_samples(0, 0, 0, dp=3, micro_batch=1, global_batch=8)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_slices_concatenate_to_the_full_sample(stream, cp, monkeypatch):
    full = SampleLoader(stream, seq_len=32, seed=1).batch(10, 4)
    reads, read = [], stream.read
    monkeypatch.setattr(stream, "read", lambda start, length: reads.append((start, length)) or read(start, length))
    slices = [SampleLoader(stream, seq_len=32, seed=1, cp=cp, cp_rank=r).batch(10, 4) for r in range(cp)]
    for name in ("input_ids", "labels", "seq_idx"):
        assert torch.equal(torch.cat([getattr(s, name) for s in slices], dim=1), getattr(full, name))
        assert all(getattr(s, name).shape == (4, 32 // cp) and getattr(s, name).dtype == torch.int64 for s in slices)
    windows = SampleLoader(stream, seq_len=32, seed=1).window_starts(10, 4)
    assert reads == [(w + r * 32 // cp, 32 // cp + 1) for r in range(cp) for w in windows]  # its columns and one label more
    with pytest.raises(ValueError, match="data.seq_len.*parallel.cp"):
        SampleLoader(stream, seq_len=30, seed=1, cp=4)


def test_labels_and_seq_idx_against_a_naive_loop(stream):
    loader = SampleLoader(stream, seq_len=24, seed=2)
    full, starts = stream.read(0, len(stream)), list(stream.doc_starts)
    batch = loader.batch(0, loader.num_windows)
    for row, begin in enumerate(loader.window_starts(0, loader.num_windows)):
        positions = range(begin, begin + 24)
        assert batch.input_ids[row].tolist() == [full[p] for p in positions]
        assert batch.labels[row].tolist() == [full[p + 1] for p in positions]
        assert batch.seq_idx[row].tolist() == [max(i for i, s in enumerate(starts) if s <= p) for p in positions]
        changes = [p for p in positions[1:] if batch.seq_idx[row, p - begin] != batch.seq_idx[row, p - begin - 1]]
        assert changes == [p for p in positions[1:] if p in starts]


def test_train_and_validation_windows_stay_in_their_split(stream):
    val_start = len(stream) - stream.meta.val_tokens
    train, val = SampleLoader(stream, 16, seed=0), SampleLoader(stream, 16, seed=0, split="val")
    assert train.window_starts(0, train.num_windows).max() + 17 <= val_start
    val_starts = val.window_starts(0, val.num_windows)
    assert val_starts.min() >= val_start and val_starts.max() + 17 <= len(stream)
    assert val.num_windows == (stream.meta.val_tokens - 1) // 16
    with pytest.raises(DataError, match=r"data.seq_len = 100000 .* validation split"):
        SampleLoader(stream, 100_000, seed=0, split="val")


# ---------------------------------------------------------------------------------------------- command lines


def test_quickstart_command_lines(tmp_path):
    steps = [("make_corpus.py", "--out", "data/corpus.jsonl", "--max-documents", "120"),
             ("train_tokenizer.py", "--input", "data/corpus.jsonl", "--vocab-size", "400", "--out", "data/tok"),
             ("prepare_data.py", "--input", "data/corpus.jsonl", "--tokenizer", "data/tok", "--out", "data/prepared", "--num-proc", "2")]
    for step in steps:
        result = run_tool(*step, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    stream = TokenStream(tmp_path / "data" / "prepared")
    assert stream.meta.num_documents == 120 and stream.meta.vocab_size == 400
    failed = run_tool("prepare_data.py", "--input", "data/missing.jsonl", "--tokenizer", "data/tok", "--out", "x", cwd=tmp_path)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines() == [
        "prepare_data.py: error: input data/missing.jsonl: no such file, no data files in that folder, or no glob match"]


def test_verify_reads_a_file_again_only_when_it_changed(copy, monkeypatch):
    import megassm.data.shards as shards

    stream = TokenStream(copy)
    stream.verify()  # everything read, verified.json written
    hashed = []
    real_sha256 = shards.file_sha256
    monkeypatch.setattr(shards, "file_sha256", lambda path: hashed.append(path.name) or real_sha256(path))
    stream.verify()
    assert hashed == []  # nothing changed: nothing read
    flip_byte(copy / "tokens_00002.bin")  # a write: new modification time
    with pytest.raises(DataError, match="tokens_00002.bin.*sha256"):
        TokenStream(copy).verify()
    assert hashed == ["tokens_00002.bin"]


def check_shared_verification(folder: Path, damaged: str | None) -> None:
    import torch.distributed as dist

    import megassm.data.shards as shards
    from megassm.train import verify_data

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=10))  # a collective's timeout, shorter than rank 1's reading
    hashed, real_sha256 = [], shards.file_sha256

    def sha256(path: Path) -> str:
        if damaged is None and dist.get_rank() == 1 and not hashed:
            time.sleep(12)  # a share that takes longer to read than a collective may wait: the other rank waits for it anyway
        hashed.append(path.relative_to(folder).as_posix())
        return real_sha256(path)

    shards.file_sha256 = sha256
    stream = TokenStream(folder)
    files = stream.unverified()
    if damaged is None:
        verify_data(stream, print)
        assert hashed == files[dist.get_rank()::2]  # each file read once, by one rank
        dist.barrier()
        assert TokenStream(folder).unverified() == []  # both ranks' files recorded
    else:
        with pytest.raises(DataError, match=f"{folder / damaged}.*sha256"):
            verify_data(stream, print)


def test_ranks_share_the_verification_and_all_stop_on_a_file_one_of_them_found_damaged(copy, tmp_path):
    (copy / "verified.json").unlink(missing_ok=True)
    files = TokenStream(copy).unverified()
    assert len(files) > 2
    run_distributed(check_shared_verification, 2, copy, None)
    damaged = Path(shutil.copytree(copy, tmp_path / "damaged"))
    (damaged / "verified.json").unlink()
    flip_byte(damaged / files[1])  # rank 1's to read
    run_distributed(check_shared_verification, 2, damaged, files[1])


def test_a_vocabulary_of_2_to_the_16_tokens_is_stored_in_uint16_and_older_uint32_folders_still_open():
    assert [token_dtype(n).name for n in (2**16, 2**16 + 1)] == ["uint16", "uint32"]
    fields = dict(vocab_size=2**16, eos_id=0, shards=[{"file": "tokens_00000.bin", "tokens": 1, "sha256": ""}], total_tokens=1,
                  num_documents=1, val_tokens=0, doc_starts_sha256="")
    assert Meta(dtype="uint32", **fields)._problem() == ""
    assert "does not suit vocab_size 65537" in Meta(dtype="uint16", **{**fields, "vocab_size": 2**16 + 1})._problem()


@pytest.mark.parametrize("limit, opens", [("-Sn 64", True), ("-n 64", False)], ids=["soft-limit-raised", "hard-limit-refused"])
def test_a_folder_of_more_shards_than_the_open_files_limit(prepared, limit, opens):
    """Each shard's memory map holds its file open: past the soft limit of open files it is raised, past the hard one
    the folder is refused in one line that says what to change."""
    shards = len(TokenStream(prepared).meta.shards)
    assert shards > 64
    code = f"from megassm.data import TokenStream; print(len(TokenStream({str(prepared)!r})._maps))"
    done = subprocess.run(["bash", "-c", f'ulimit {limit} && exec "$0" -c "$1"', sys.executable, code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if opens:
        assert done.returncode == 0 and done.stdout.split() == [str(shards)], done.stderr[-2000:]
    else:
        assert f"{prepared} has {shards} shards, each held open while training, and this process may open 64 files at most" in done.stderr


def test_a_preparation_keeps_datasets_copies_in_its_folder_and_deletes_them(sp_dir, tmp_path, monkeypatch):
    """datasets copies the documents and their tokens (twice the corpus): not into the home folder's cache, but into
    the preparation's own folder, deleted once the shards are written."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "home_cache")
    out = prepare([write_jsonl(tmp_path / "docs.jsonl", DOCUMENTS)], sp_dir, tmp_path / "out", num_proc=2, shard_tokens=SHARD_TOKENS)
    assert not list((tmp_path / "home_cache").rglob("*.arrow"))
    assert {p.name for p in out.iterdir()} == {"meta.json", "doc_starts.npy", "tokenizer", *(s.file for s in TokenStream(out).meta.shards)}
    assert np.array_equal(TokenStream(out).doc_starts, TokenStream(prepare([write_jsonl(tmp_path / "again.jsonl", DOCUMENTS)], sp_dir,
                          tmp_path / "cached", cache_dir=tmp_path / "cache", shard_tokens=SHARD_TOKENS)).doc_starts)


def test_a_data_folder_that_cannot_record_its_verification_says_so(copy, monkeypatch):
    from megassm.train import verify_data

    (copy / "verified.json").unlink(missing_ok=True)
    def read_only(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", read_only)
    said = []
    verify_data(TokenStream(copy), said.append)
    assert said == [f"warning: cannot write {copy}/verified.json: every start reads the whole data folder again to verify it; "
                    "once it has passed, data.verify = false skips that"]
    assert TokenStream(copy).unverified()  # nothing recorded


def test_a_tokenizer_trains_on_a_sample_of_a_large_corpus():
    """Documents at random, in order, about twice the lines sentencepiece samples: not the whole corpus read."""
    import datasets

    from megassm.data.prepare import sample_documents

    texts = [f"document {i}\nits second line" for i in range(10_000)]
    documents = datasets.Dataset.from_dict({"text": texts})
    sample = sample_documents(documents, lines=300)["text"]
    assert len(sample) == 300 and sample == sorted(set(sample), key=texts.index) and set(sample) <= set(texts)
    assert sample != texts[:300]  # chosen at random, not the first ones
    assert sample_documents(documents, lines=10_000)["text"] == texts  # as many lines as it holds: all of it

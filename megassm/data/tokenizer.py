"""Tokenizers: one small interface over sentencepiece models (which megassm can train) and Hugging Face
tokenizers (a local folder or a hub name), and `load_tokenizer`, which tells them apart by what is on disk."""

from __future__ import annotations

import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece

MAKE_ONE = "make one with python tools/train_tokenizer.py --input CORPUS --vocab-size N --out DIR"
SENTENCEPIECE_FILE = "tokenizer.model"
HF_FILES = ("tokenizer.json", "tokenizer_config.json")
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
LOCAL_SUFFIXES = {".model", ".txt", ".json", ".jsonl", ".parquet", ".gz", ".bz2", ".xz", ".zst"}
MAX_SENTENCES = 10_000_000  # lines a sentencepiece tokenizer trains on at most
MIN_VOCAB_SIZE = 260  # 256 byte pieces, unk, bos, eos and one learned piece


def is_hub_name(name: str | Path) -> bool:
    """Whether a name that is not a local path should be looked up on the Hugging Face hub: "name" or
    "org/name", without a local file's extension, and not under a folder that exists here (then it is
    a local path with a typo, and looking it up online would only wait for retries)."""
    path = Path(name)
    return bool(HUB_NAME.fullmatch(str(name))) and path.suffix.lower() not in LOCAL_SUFFIXES and not Path(path.parts[0]).exists()


class Tokenizer(ABC):
    """What megassm needs of a tokenizer. `encode` adds no special tokens: the data preparation puts
    `eos_id` before every document itself. Ids are in [0, vocab_size)."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the tokenizer into `directory` (created) so that load_tokenizer(directory) reads it back."""


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str | Path):
        self.model_file = Path(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as error:  # e.g. "could not parse ModelProto"
            raise ValueError(f"tokenizer {model_file}: not a sentencepiece model ({str(error).splitlines()[0]}); {MAKE_ONE}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"{model_file}: this sentencepiece model has no EOS piece; {MAKE_ONE}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)  # data preparation parallelises over processes

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.model_file, directory / SENTENCEPIECE_FILE)


class HFTokenizer(Tokenizer):
    def __init__(self, name_or_path: str | Path):
        from transformers import AutoTokenizer  # here: transformers is needed only for this kind

        try:
            self._tok = AutoTokenizer.from_pretrained(str(name_or_path))
        except ValueError as error:  # a malformed tokenizer.json or tokenizer_config.json (JSONDecodeError among them)
            raise ValueError(f"tokenizer {name_or_path}: transformers cannot read it ({str(error).splitlines()[0]})") from None
        self.eos_id = self._tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"tokenizer {name_or_path} has no EOS token: set eos_token in its tokenizer_config.json")
        # The largest id + 1 (added tokens included): ids may leave gaps, which len() does not count.
        self.vocab_size = max(len(self._tok), max(self._tok.get_vocab().values(), default=-1) + 1, self.eos_id + 1)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:  # transformers fails on an empty batch
            return []
        # A special token's text inside a document ("<|endoftext|>" in code about tokenizers) is text: only the
        # preparation puts EOS between documents.
        return self._tok(texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False,
                         verbose=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    def save(self, directory: Path) -> None:
        self._tok.save_pretrained(directory)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A sentencepiece `.model` file or a folder holding only `tokenizer.model` -> sentencepiece; a folder
    with tokenizer.json or tokenizer_config.json -> Hugging Face (such folders may also hold a
    tokenizer.model, but their config names the special tokens); a name like "org/name" that is not a
    local path -> the Hugging Face hub."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".model":
            raise ValueError(f"tokenizer {path}: give a sentencepiece .model file or the folder of a tokenizer")
        return SentencePieceTokenizer(path)
    if any((path / name).is_file() for name in HF_FILES):
        return HFTokenizer(path)
    if (path / SENTENCEPIECE_FILE).is_file():
        return SentencePieceTokenizer(path / SENTENCEPIECE_FILE)
    if path.is_dir():
        raise FileNotFoundError(f"{path} holds no tokenizer ({SENTENCEPIECE_FILE}, {' or '.join(HF_FILES)}); {MAKE_ONE}")
    if is_hub_name(path):
        try:
            return HFTokenizer(str(path))
        except OSError as error:
            reason = str(error).splitlines()[0]
            raise FileNotFoundError(f"tokenizer {path}: no such file or folder, nor a hub tokenizer ({reason}); {MAKE_ONE}") from None
    raise FileNotFoundError(f"tokenizer {path}: no such file or folder; {MAKE_ONE}")


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    model_type: str = "bpe",
    max_sentences: int = MAX_SENTENCES,
) -> Path:
    """Train a sentencepiece model on documents and write `out_dir/tokenizer.model`; returns out_dir.

    Byte fallback makes every text encodable; identity normalisation, kept whitespace and no dummy
    prefix make decode(encode(text)) == text exactly (code and indentation survive). Ids: unk 0,
    bos 1, eos 2; 256 byte pieces; the rest learned. At most `max_sentences` lines, sampled; lines
    over 16 KiB are skipped."""
    out_dir = Path(out_dir)
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # sentencepiece trains on sentences: the non-blank lines of every document (newlines are byte pieces).
    lines = (line for text in texts if text for line in text.split("\n") if line.strip())
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_prefix=str(out_dir / "tokenizer"),
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, max_sentence_length=16384, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, num_threads=os.cpu_count(), minloglevel=2,
        )
    except RuntimeError as error:  # e.g. "Vocabulary size is too high (512). Please set it to a value <= 300."
        if made:
            shutil.rmtree(out_dir, ignore_errors=True)
        if needed := re.search(r"smaller than required_chars. (\d+) vs (\d+)", str(error)):  # its advice names its own options
            raise ValueError(f"a vocabulary of {needed[1]} is smaller than the {needed[2]} pieces the corpus needs at least (its "
                             "characters, 256 byte pieces, unk, bos, eos): raise the vocabulary size") from None
        raise ValueError(f"sentencepiece training failed: {error}") from None
    return out_dir

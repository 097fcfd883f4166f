"""The prepared data folder: its format, a writer for its shards, and TokenStream, the reader.

    meta.json          what is here: format version, token dtype, vocabulary, EOS id, tokenizer folder,
                       the shards (file, token count, sha256), document count, validation tokens, the
                       tokenizer's files' sha256
    tokens_00000.bin   raw little-endian token ids; all shards in order form one packed stream in which
    tokens_00001.bin   every document is [eos_id] + tokens(document): EOS first and between documents
    doc_starts.npy     int64, the stream position of each document's leading EOS (ascending, from 0)
    tokenizer/         the tokenizer that made the ids (load it with megassm.data.load_tokenizer)
    verified.json      written by TokenStream.verify(): the size and mtime of each file whose sha256 matched

The last `val_tokens` tokens of the stream are the validation documents; the rest is for training.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import resource
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from megassm.errors import UserError

FORMAT_VERSION = 1
META_FILE = "meta.json"
DOC_STARTS_FILE = "doc_starts.npy"
VERIFIED_FILE = "verified.json"
TOKENIZER_DIR = "tokenizer"
CACHE_DIR = "datasets_cache"  # datasets' copies of the documents and tokens while a preparation runs
SPLITS = ("train", "val")
REPAIR = "re-create the folder with python tools/prepare_data.py"
SHARD_FILE = re.compile(r"tokens_\d{5,}\.bin")
VERIFIED_PARTIAL = re.compile(re.escape(VERIFIED_FILE) + r"\.\d+\.tmp")  # verify()'s file before its rename


class DataError(UserError, ValueError):
    """A prepared data folder is missing, incomplete or corrupt, or cannot serve what was asked of it."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (up to vocab_size - 1) fits, else uint32; little-endian on disk whatever the machine."""
    return np.dtype("<u2" if vocab_size <= 2**16 else "<u4")


def _allow_open_files(shards: int, folder: Path) -> None:
    """Raise this process's soft limit of open files (often 1024) toward its hard limit where the shards need it: each
    shard's memory map holds its file open; DataError where even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = shards + 256  # and what the rest of the process opens
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise DataError(f"{folder} has {shards} shards, each held open while training, and this process may open "
                        f"{hard} files at most (ulimit -Hn): raise that limit, or prepare the data again with a larger "
                        "--shard-tokens")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else hard, hard))


def shard_name(index: int) -> str:
    return f"tokens_{index:05d}.bin"


def written_by_preparation(name: str) -> bool:
    """Whether a data folder's entry is one that a preparation (or TokenStream.verify) writes: what an
    --overwrite may delete."""
    own = {META_FILE, DOC_STARTS_FILE, VERIFIED_FILE, TOKENIZER_DIR, CACHE_DIR}
    return name in own or bool(SHARD_FILE.fullmatch(name) or VERIFIED_PARTIAL.fullmatch(name))


def folder_sha256(folder: Path) -> str:
    """One sha256 over a folder's files, their paths in it and their contents (a tokenizer's identity)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)} {file_sha256(path)}\n".encode())
    return digest.hexdigest()


def tokenizer_files(tokenizer: Path) -> list[str]:
    """A tokenizer's files, as paths in its folder (the keys of Meta.tokenizer_sha256)."""
    return sorted(path.relative_to(tokenizer).as_posix() for path in tokenizer.rglob("*") if path.is_file())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Shard:
    file: str
    tokens: int
    sha256: str


@dataclass
class Meta:
    vocab_size: int
    eos_id: int
    dtype: str  # "uint16" | "uint32"
    shards: list[Shard]
    total_tokens: int
    num_documents: int
    val_tokens: int  # the stream's last val_tokens tokens are the validation split
    doc_starts_sha256: str
    tokenizer: str = TOKENIZER_DIR  # relative to the data folder
    tokenizer_sha256: dict[str, str] = field(default_factory=dict)  # its files' sha256 by path in its folder (empty: unchecked)
    source: dict = field(default_factory=dict)  # how the folder was made: inputs, text key, tokenizer
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.shards = [s if isinstance(s, Shard) else Shard(**s) for s in self.shards]

    def write(self, folder: Path) -> None:
        fields = dataclasses.asdict(self)
        version, shards = fields.pop("version"), fields.pop("shards")  # first and last, for whoever reads the file
        (folder / META_FILE).write_text(json.dumps({"version": version, **fields, "shards": shards}, indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> "Meta":
        path = folder / META_FILE
        if folder.is_file():
            raise DataError(f"{folder} is a file, not a prepared data folder: tokenize a raw corpus first, with "
                            f"python tools/prepare_data.py --input {folder} --tokenizer TOKENIZER --out DIR, and give DIR as data.path")
        if not folder.is_dir():
            raise DataError(f"{folder}: no such data folder; make one with python tools/prepare_data.py --out {folder} ...")
        if not path.is_file():
            raise DataError(f"{path} not found: {folder} is not a prepared data folder (or its preparation did not finish); {REPAIR}")
        try:
            meta = cls(**json.loads(path.read_text()))
            problem = meta._problem()
        except (ValueError, TypeError, AttributeError) as error:
            meta, problem = None, f"not a megassm data description ({error})"
        if problem:
            raise DataError(f"{path}: {problem}; {REPAIR}")
        return meta

    def _problem(self) -> str:
        """What makes this description unusable, or "" when nothing does."""
        for record in [self, *self.shards]:
            for name, kind in typing.get_type_hints(type(record)).items():
                value = getattr(record, name)
                plain = isinstance(kind, type) and typing.get_origin(kind) is None  # list[Shard]: checked by __post_init__
                if plain and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
                    return f"{name} = {value!r} is not {kind.__name__}"
        if not isinstance(self.tokenizer_sha256, dict) or not all(isinstance(v, str) for v in self.tokenizer_sha256.values()):
            return "tokenizer_sha256 is not a table of the tokenizer's files' sha256"
        if self.version != FORMAT_VERSION:
            return f"format version {self.version}, this megassm reads version {FORMAT_VERSION}"
        if self.dtype not in ("uint16", "uint32") or np.dtype(self.dtype).itemsize < token_dtype(self.vocab_size).itemsize:
            return f"dtype {self.dtype!r} does not suit vocab_size {self.vocab_size}"  # uint32 for 2^16 tokens: an older preparation
        if not 0 <= self.eos_id < self.vocab_size:
            return f"eos_id {self.eos_id} is outside the vocabulary of {self.vocab_size}"
        if self.total_tokens != sum(s.tokens for s in self.shards) or not 0 <= self.val_tokens < self.total_tokens:
            return "total_tokens and val_tokens disagree with the shard list"
        if self.num_documents < 1:
            return "no documents"
        return ""


class ShardWriter:
    """Appends tokens to tokens_00000.bin, tokens_00001.bin, ... of at most `shard_tokens` tokens each,
    hashing as it writes so that no shard is read twice. Use as a context manager; then `shards`."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[Shard] = []
        self._file: BinaryIO | None = None
        self._digest = hashlib.sha256()

    def write(self, tokens: np.ndarray) -> None:
        data = np.asarray(tokens).astype(self.dtype, copy=False)
        while len(data):
            if self._file is None:
                self._file = open(self.folder / shard_name(len(self.shards)), "wb")
                self.shards.append(Shard(shard_name(len(self.shards)), 0, ""))
            shard = self.shards[-1]
            room = self.shard_tokens - shard.tokens
            piece, data = data[:room], data[room:]
            self._file.write(piece.tobytes())
            self._digest.update(piece.tobytes())
            shard.tokens += len(piece)
            if shard.tokens == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        self.shards[-1].sha256 = self._digest.hexdigest()
        self._digest = hashlib.sha256()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._close_shard()


class TokenStream:
    """A prepared data folder as one virtual token stream, memory-mapped shard by shard.

    Opening checks that every shard exists with the size meta.json gives (cheap: a stat per shard);
    `verify()` also checks their contents against the recorded sha256 (reads everything)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = Meta.read(self.path)
        self.dtype = np.dtype(self.meta.dtype).newbyteorder("<")
        _allow_open_files(len(self.meta.shards), self.path)
        self._maps = [self._open_shard(shard) for shard in self.meta.shards]
        self._check_tokenizer_files()
        self._offsets = np.cumsum([0] + [shard.tokens for shard in self.meta.shards])
        self.doc_starts = self._open_doc_starts()

    def _open_shard(self, shard: Shard) -> np.memmap:
        path = self.path / shard.file
        if not path.is_file():
            raise DataError(f"{path}: shard missing; {REPAIR}")
        size, expected = path.stat().st_size, shard.tokens * self.dtype.itemsize
        if size != expected:
            raise DataError(f"{path} is {size} bytes, meta.json says {expected} ({shard.tokens} {self.meta.dtype} tokens): "
                            f"truncated or overwritten; {REPAIR}")
        return np.memmap(path, dtype=self.dtype, mode="r")

    def _check_tokenizer_files(self) -> None:
        """The tokenizer's folder holds the files prepare_data saved, no more (a tokenizer.json added beside a
        sentencepiece model would be read first); their contents are checked with the shards'. A folder that is gone
        is the trainer's to name."""
        recorded = sorted(self.meta.tokenizer_sha256)
        if recorded and self.tokenizer_path.is_dir() and tokenizer_files(self.tokenizer_path) != recorded:
            raise DataError(f"{self.tokenizer_path} holds other files than the tokenizer saved with the data "
                            f"({', '.join(recorded)}); {REPAIR}")

    def _open_doc_starts(self) -> np.ndarray:
        path = self.path / DOC_STARTS_FILE
        try:
            starts = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise DataError(f"{path}: cannot read the document index ({error}); {REPAIR}") from None
        if starts.dtype != np.int64 or starts.shape != (self.meta.num_documents,) or starts[0] != 0 or starts[-1] >= len(self):
            raise DataError(f"{path} does not index {self.meta.num_documents} documents of a {len(self)}-token stream; {REPAIR}")
        return starts

    def __len__(self) -> int:
        return self.meta.total_tokens

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.meta.tokenizer

    def split(self, name: str) -> tuple[int, int]:
        """(first stream position, number of tokens) of the "train" or "val" split."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        train = len(self) - self.meta.val_tokens
        return (0, train) if name == "train" else (train, self.meta.val_tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, across shard edges, as a new array."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) are outside the {len(self)}-token stream of {self.path}")
        pieces = []
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while length > 0:
            local = start - int(self._offsets[shard])
            take = min(length, len(self._maps[shard]) - local)
            pieces.append(self._maps[shard][local : local + take])
            start, length, shard = start + take, length - take, shard + 1
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def verify(self) -> bool:
        """Check every shard and the document index against meta.json's sha256 (those not verified since they last
        changed), and record what matched; False where that record cannot be written (read again next time)."""
        return self.record_verified(self.check(self.unverified()))

    def unverified(self) -> list[str]:
        """The files (shards, document index) not verified since they last changed.

        Reading a large corpus takes long, and a run verifies at every start and restart: a file whose
        size and modification time are those recorded in verified.json when it last matched is not
        read again (rsync's quick check: a change that keeps both, such as silent bit rot, goes unseen
        after the first verification; delete verified.json to read everything again)."""
        try:
            stamps = json.loads((self.path / VERIFIED_FILE).read_text())
        except (OSError, ValueError):
            stamps = {}
        return [name for name in self._expected_sha256 if stamps.get(name) != self._stamp(name)]

    def check(self, names: list[str]) -> dict[str, list]:
        """Read these files against meta.json's sha256: DataError naming the first that differs, else their stamps
        (size, modification time, sha256) for record_verified."""
        stamps = {name: self._stamp(name) for name in names}  # before reading: a write meanwhile leaves it unverified
        for name in names:
            if file_sha256(self.path / name) != self._expected_sha256[name]:
                raise DataError(f"{self.path / name}: contents differ from meta.json's sha256 (corrupt or replaced); {REPAIR}")
        return stamps

    def record_verified(self, stamps: dict[str, list]) -> bool:
        """Add the stamps of files that matched to verified.json; False where the folder cannot be written."""
        stamp_path = self.path / VERIFIED_FILE
        try:
            recorded = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            recorded = {}
        try:
            partial = stamp_path.with_name(f"{VERIFIED_FILE}.{os.getpid()}.tmp")
            partial.write_text(json.dumps({**recorded, **stamps}, indent=1))
            os.replace(partial, stamp_path)
        except OSError:
            return False
        return True

    @functools.cached_property
    def _expected_sha256(self) -> dict[str, str]:
        return {**{shard.file: shard.sha256 for shard in self.meta.shards}, DOC_STARTS_FILE: self.meta.doc_starts_sha256,
                **{f"{self.meta.tokenizer}/{name}": sha256 for name, sha256 in self.meta.tokenizer_sha256.items()}}

    def _stamp(self, name: str) -> list:
        stat = (self.path / name).stat()
        return [stat.st_size, stat.st_mtime_ns, self._expected_sha256[name]]

"""Bad inputs to the data preparation: a corpus or tokenizer that cannot be read is named with its line
in one line, and --overwrite replaces a previous preparation but never deletes anything else."""

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megassm.data import DataError, TokenStream, load_tokenizer
from megassm.data.prepare import load_documents, prepare
from megassm.data.shards import TOKENIZER_DIR
from tests.commands import error_lines, load_tool, run_tool, user_error

TEXTS = ["first document", "the second one", "a third\twith a tab", "and a fourth"]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def records(texts: list[str]) -> list[str]:
    return [json.dumps({"text": text}) for text in texts]


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file below root, by relative path: a folder's exact contents."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- unreadable inputs


def gz_lines(path: Path, lines: list[str]) -> Path:
    path.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode()))
    return path


UNREADABLE = [
    ("bad.jsonl", lambda p: write_jsonl(p, records(TEXTS[:2]) + ['{"text": broken}', *records(TEXTS[2:])]),
     r"bad.jsonl line 3: malformed JSON \(Expecting value at column 10\)"),
    ("bad.jsonl.gz", lambda p: gz_lines(p, records(TEXTS) + ["", "[1, 2]"]), r"bad.jsonl.gz line 6: a JSON list where a JSON object"),
    ("number.jsonl", lambda p: write_jsonl(p, records(TEXTS) + ['{"text": 5}']), r"number.jsonl line 5: the 'text' field is a int"),
    ("empty.jsonl", lambda p: p.write_text(""), r"no documents: .*empty.jsonl is empty"),
    ("empty.txt", lambda p: p.write_text(""), r"no documents: .*empty.txt is empty"),
    ("binary.txt", lambda p: p.write_bytes(b"text\n" + bytes(range(128, 256))), r"binary.txt line 2: not UTF-8 text"),
    ("binary.jsonl", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256))), r"binary.jsonl line 1: not UTF-8 text"),
    ("fake.parquet", lambda p: p.write_text("not parquet"), r"fake.parquet: not a parquet file \(Parquet magic bytes"),
]


@pytest.mark.parametrize("name, make, message", UNREADABLE, ids=[case[0] for case in UNREADABLE])
def test_unreadable_input_is_named_with_its_line(tmp_path, name, make, message):
    make(tmp_path / name)
    with pytest.raises(DataError, match=message):
        load_documents([tmp_path / name], cache_dir=tmp_path / "cache")


def test_unreadable_tokenizer_is_named(tmp_path):
    (tmp_path / "garbage.model").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path / 'garbage.model'}: not a sentencepiece model"):
        load_tokenizer(tmp_path / "garbage.model")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match=f"tokenizer {tmp_path / 'hf'}: transformers cannot read it"):
        load_tokenizer(tmp_path / "hf")


def test_command_lines_print_one_line(tmp_path, prepared_data):
    """The tools themselves: exit code 1 and one line on stderr naming the file and line, no traceback."""
    write_jsonl(tmp_path / "corpus.jsonl", records(TEXTS[:2]) + ['{"text": broken}'])
    why = f"{tmp_path / 'corpus.jsonl'} line 3: malformed JSON (Expecting value at column 10); each line must be one JSON object"
    tokenizer = run_tool("train_tokenizer.py", "--input", tmp_path / "corpus.jsonl", "--vocab-size", "300", "--out", "tok", cwd=tmp_path)
    prepared = run_tool("prepare_data.py", "--input", tmp_path / "corpus.jsonl", "--tokenizer", prepared_data / TOKENIZER_DIR,
                        "--out", "out", "--num-proc", "1", cwd=tmp_path)
    for tool, done in (("train_tokenizer.py", tokenizer), ("prepare_data.py", prepared)):
        assert done.returncode == 2 and error_lines(done.stderr) == [f"{tool}: error: {why}"], done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_train_tokenizer_refuses_what_cannot_train_before_reading_the_corpus(tmp_path, capsys):
    main = load_tool("train_tokenizer.py").main
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl(corpus, records(TEXTS))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.model").write_text("an earlier tokenizer")
    (tmp_path / "file").write_text("")
    for args, line in [
        (["--vocab-size", "0"], "--vocab-size 0: at least 260 (256 byte pieces, unk, bos, eos and one learned piece)"),
        (["--vocab-size", "300", "--max-sentences", "0"], "--max-sentences 0: train on at least one line"),
        (["--vocab-size", "300", "--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'} is a file: name a folder"),
        (["--vocab-size", "300", "--out", str(tmp_path / "old")],
         f"--out {tmp_path / 'old'} is not empty (a tokenizer of an earlier training?): choose another folder, or pass --overwrite"),
    ]:
        err = user_error(capsys, main, ["--input", str(corpus), "--out", str(tmp_path / "new"), *args])
        assert err.startswith(f"train_tokenizer.py: error: {line}"), err
    assert (tmp_path / "old" / "tokenizer.model").read_text() == "an earlier tokenizer" and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit, match="2"):  # after reading the corpus: sentencepiece's own advice names options the tool has not
        main(["--input", str(corpus), "--out", str(tmp_path / "new"), "--vocab-size", "262"])
    assert error_lines(capsys.readouterr().err) == [
        "train_tokenizer.py: error: a vocabulary of 262 is smaller than the 277 pieces the corpus needs at least (its characters, 256 byte "
        "pieces, unk, bos, eos): raise the vocabulary size"]
    (tmp_path / "old" / "tokenizer.json").write_text("{}")  # a transformers tokenizer's files, which load_tokenizer reads first
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    err = user_error(capsys, main, ["--input", str(corpus), "--out", str(tmp_path / "run"), "--vocab-size", "300", "--overwrite"])
    assert err == f"train_tokenizer.py: error: --out {tmp_path / 'run'} holds folders, as no tokenizer's folder does (a data or run " \
                  "folder?): choose another"
    main(["--input", str(corpus), "--out", str(tmp_path / "old"), "--vocab-size", "300", "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["tokenizer.model", "tokenizer.vocab"]
    assert load_tokenizer(tmp_path / "old").vocab_size == 300 and not list(tmp_path.glob(".*.training"))


@pytest.mark.parametrize("option, value", [("val_fraction", 1.5), ("shard_tokens", 0), ("num_proc", -3)])
def test_prepare_refuses_what_cannot_run_before_reading_anything(tmp_path, option, value):
    with pytest.raises(ValueError, match=f"{option} = {value}|{option} must be in"):
        prepare([tmp_path / "no corpus needed"], tmp_path / "no tokenizer needed", tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---------------------------------------------------------------------------------------------- --overwrite


@pytest.fixture
def previous(tmp_path, prepared_data) -> Path:
    """tmp_path with a corpus (corpus/), a tokenizer (tok/) and a preparation of them in out/, verified once."""
    write_jsonl(tmp_path / "corpus" / "docs.jsonl", records(TEXTS))
    shutil.copytree(prepared_data / TOKENIZER_DIR, tmp_path / "tok")
    out = prepare([tmp_path / "corpus"], tmp_path / "tok", tmp_path / "out", cache_dir=tmp_path / "cache")
    TokenStream(out).verify()  # verified.json: also the preparation's own
    return tmp_path


def test_overwrite_replaces_a_previous_preparation_and_nothing_else(previous):
    kept = {name: file_hashes(previous / name) for name in ("corpus", "tok")}
    write_jsonl(previous / "corpus" / "docs.jsonl", records(TEXTS[::-1] * 2))
    prepare([previous / "corpus"], previous / "tok", previous / "out", cache_dir=previous / "cache", overwrite=True, val_fraction=0)
    stream = TokenStream(previous / "out")
    tokenizer = load_tokenizer(previous / "tok")
    want = [token for text in TEXTS[::-1] * 2 for token in [tokenizer.eos_id, *tokenizer.encode(text)]]
    assert np.array_equal(stream.read(0, len(stream)), want) and stream.meta.num_documents == 8
    assert file_hashes(previous / "tok") == kept["tok"] and file_hashes(previous / "corpus") != kept["corpus"]  # rewritten above


@pytest.mark.parametrize("arrange, out, message", [
    (lambda root: (root / "out" / "notes.txt").write_text("mine"), "out",
     r"out holds files that prepare_data.py did not write \(notes.txt\)"),
    (lambda root: None, "corpus", r"corpus holds files that prepare_data.py did not write \(docs.jsonl\)"),
    (lambda root: (root / "out.partial").mkdir() or (root / "out.partial" / "x.bin").write_text("mine"), "out",
     r"out.partial holds files that prepare_data.py did not write \(x.bin\)"),
    (lambda root: shutil.move(root / "tok", root / "out" / "tokenizer" / "mine"), "out",
     r"the input .*out/tokenizer/mine is inside .*out,"),
    (lambda root: None, "corpus/docs.jsonl", r"docs.jsonl is a file, not a data folder"),
], ids=["foreign-file", "out-is-the-input-folder", "foreign-file-in-partial", "tokenizer-inside-out", "out-is-an-input-file"])
def test_overwrite_refuses_what_it_did_not_write_and_changes_nothing(previous, arrange, out, message):
    arrange(previous)
    tokenizer = previous / "tok" if (previous / "tok").exists() else previous / "out" / "tokenizer" / "mine"
    before = file_hashes(previous)
    with pytest.raises(DataError, match=message):
        prepare([previous / "corpus"], tokenizer, previous / out, cache_dir=previous / "cache", overwrite=True)
    assert file_hashes(previous) == before


def test_overwrite_refusal_on_the_command_line(previous):
    (previous / "out" / "notes.txt").write_text("mine")
    before = file_hashes(previous)
    done = run_tool("prepare_data.py", "--input", "corpus", "--tokenizer", "tok", "--out", "out", "--overwrite", cwd=previous)
    assert done.returncode == 2 and error_lines(done.stderr) == [
        "prepare_data.py: error: out holds files that prepare_data.py did not write (notes.txt): choose another --out or move them "
        "away"], done.stderr
    assert file_hashes(previous) == before

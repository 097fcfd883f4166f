"""Why `datasets` could not read local input files: the first file and line at fault, as one line.

`datasets` reports a malformed record as "An error occurred while generating the dataset", naming
neither file nor line. The inputs are scanned only after such a failure, so a healthy corpus is
read once (by `datasets`), however large it is.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path
from typing import Callable, Iterator

OPENERS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # .zst needs a package: not scanned


def first_problem(files: list[Path], builder: str, text_key: str) -> str | None:
    """"FILE line N: what is wrong" for the first bad record of the files (read as `builder` reads them:
    "text", "json" or "parquet"), "no documents: ..." when they are all empty, None when the scan finds
    nothing wrong."""
    empty = True
    for file in files:
        if builder == "parquet":
            problem, rows = _parquet(file)
            empty = empty and not rows
        else:
            problem, lines = _lines_problem(file, builder == "json", text_key)
            empty = empty and not lines
        if problem:
            return problem
    return f"no documents: {', '.join(map(str, files))} {'is' if len(files) == 1 else 'are'} empty" if empty else None


def root_cause(error: BaseException) -> str:
    """The innermost exception of a chain, as "Type: first line of its message"."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    message = str(error).strip().splitlines()
    return type(error).__name__ + (f": {message[0]}" if message else "")


def _parquet(file: Path) -> tuple[str | None, int]:
    import pyarrow.parquet as pq

    try:
        return None, pq.read_metadata(file).num_rows
    except (OSError, ValueError) as error:  # pyarrow.ArrowInvalid is a ValueError
        return f"{file}: not a parquet file ({str(error).splitlines()[0]})", 0


def _numbered_lines(file: Path) -> Iterator[tuple[int, bytes]]:
    opener = OPENERS.get(file.suffix.lower(), open)
    with opener(file, "rb") as f:
        yield from enumerate(f, start=1)


def _lines_problem(file: Path, is_json: bool, text_key: str) -> tuple[str | None, int]:
    """(the first bad line's problem or None, the number of non-blank lines read)."""
    if file.suffix.lower() == ".zst":
        return None, 1
    count = 0
    for number, raw in _numbered_lines(file):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return f"{file} line {number}: not UTF-8 text (a binary file?)", count
        if not line.strip():
            continue
        count += 1
        if is_json and (problem := _record_problem(line, text_key)):
            return f"{file} line {number}: {problem}", count
    return None, count


def _record_problem(line: str, text_key: str) -> str | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"malformed JSON ({error.msg} at column {error.colno}); each line must be one JSON object"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__} where a JSON object (one record per line) belongs"
    value = record.get(text_key)
    if value is not None and not isinstance(value, str):
        return f"the {text_key!r} field is a {type(value).__name__}, not text"
    return None

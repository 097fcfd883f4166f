"""Write the built-in corpus (Python's own documentation, generated here, no download) as JSON lines.

    python tools/make_corpus.py --out data/builtin.jsonl
"""

from __future__ import annotations

import argparse

from megassm.data import write_builtin_corpus
from megassm.errors import exit_on_user_error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON lines file to write ({\"text\": ...} per document)")
    parser.add_argument("--max-documents", type=int, help="write only the first N documents")
    args = parser.parse_args(argv)
    try:
        path = write_builtin_corpus(args.out, args.max_documents)
    except OSError as error:
        exit_on_user_error(__file__, str(error))
    with open(path, encoding="utf-8") as f:
        print(f"wrote {sum(1 for _ in f)} documents ({path.stat().st_size / 2**20:.1f} MiB) to {path}")


if __name__ == "__main__":
    main()

from pathlib import Path

import pytest
import torch

from megassm.data import train_sentencepiece
from megassm.data.corpus import builtin_documents, write_builtin_corpus
from megassm.data.prepare import prepare


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """A prepared data folder as the quickstart makes it, from the first 80 documents of the built-in
    corpus with a 512-token sentencepiece tokenizer (the debug model's vocabulary)."""
    root = tmp_path_factory.mktemp("builtin")
    corpus = write_builtin_corpus(root / "corpus.jsonl", max_documents=80)
    tokenizer = train_sentencepiece(builtin_documents(), vocab_size=512, out_dir=root / "tokenizer", max_sentences=20000)
    return prepare([corpus], tokenizer, root / "prepared", num_proc=1, val_fraction=0.05, cache_dir=root / "cache")

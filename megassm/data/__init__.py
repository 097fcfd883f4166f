"""Data: tokenizers (sentencepiece, Hugging Face), the built-in corpus, documents -> packed token
shards, and the resumable sample loader (DESIGN.md section 5)."""

from megassm.data.corpus import write_builtin_corpus
from megassm.data.loader import Batch, SampleLoader, rank_samples
from megassm.data.prepare import iter_texts, load_documents, prepare
from megassm.data.shards import DataError, Meta, TokenStream
from megassm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "Batch",
    "DataError",
    "Meta",
    "SampleLoader",
    "TokenStream",
    "Tokenizer",
    "iter_texts",
    "load_documents",
    "load_tokenizer",
    "prepare",
    "rank_samples",
    "train_sentencepiece",
    "write_builtin_corpus",
]

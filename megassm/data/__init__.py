"""Data: tokenizers (sentencepiece, Hugging Face), the built-in corpus, documents -> packed token
shards, and the resumable sample loader (docs/architecture.md, section 6).

Documents -> shards (`megassm.data.prepare`) needs the `datasets` library; it is not imported here,
so that training, which only reads shards, starts fast and does without it."""

from megassm.data.corpus import write_builtin_corpus
from megassm.data.loader import Batch, SampleLoader, rank_samples
from megassm.data.shards import DataError, Meta, TokenStream
from megassm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "Batch",
    "DataError",
    "Meta",
    "SampleLoader",
    "TokenStream",
    "Tokenizer",
    "load_tokenizer",
    "rank_samples",
    "train_sentencepiece",
    "write_builtin_corpus",
]

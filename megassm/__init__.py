"""megassm: distributed pretraining of Mamba-2 language models."""

__version__ = "0.1.0"

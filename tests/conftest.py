"""Shared test fixtures: paths to the corpora and a tiny model config."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"


def corpus(name: str) -> Path:
    """A file of ../shared/corpora, or a skip naming what is missing."""
    path = CORPORA / name
    if not path.exists():
        pytest.skip(f"corpus {path} is absent (tests expect ../shared/corpora beside the repo)")
    return path


def tiny_config(**overrides):
    from teleflm.model import TeleFLMConfig

    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return TeleFLMConfig(**{**fields, **overrides})

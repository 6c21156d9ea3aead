"""Shared test helpers: real text that every clone has, and a tiny model config."""

import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def sample_text(name: str) -> str:
    """Real text that ships with the clone: "kjv" (the King James Bible) and "poems" (Tang and Song
    poems) from the embedded sample, "code" from the Python standard library's own sources."""
    from teleflm.data import sample

    documents = {"kjv": sample.kjv_chapters, "poems": sample.poems, "code": sample.stdlib_sources}[name]
    return "\n\n".join(documents())


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

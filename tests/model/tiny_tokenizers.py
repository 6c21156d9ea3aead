"""Tiny tokenizers trained on the fly (never fetched from a hub), shaped like the real ones."""

import json
from pathlib import Path

from teleflm.testing import OFFICIAL_TOKENIZER_CONFIG
from tests.conftest import sample_text

SENTENCEPIECE_VOCAB = 2000  # the model configs of these tests pad the embedding to 2048 rows


def train_sentencepiece(out_dir: Path) -> Path:
    """A folder like the official tokenizer's: a SentencePiece BPE `tokenizer.model` with byte
    fallback, `<unk> <s> </s> <pad>` = 0..3, no normalisation, and a tokenizer_config.json naming
    LlamaTokenizer without BOS. Trained on English and classical Chinese, so that rare Chinese
    characters fall back to bytes."""
    import sentencepiece as spm

    text = sample_text("kjv")[:200_000] + sample_text("poems")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(out_dir / "train.txt"),
        model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=SENTENCEPIECE_VOCAB,
        byte_fallback=True,
        character_coverage=0.98,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    (out_dir / "train.txt").unlink()
    (out_dir / "tokenizer.vocab").unlink()
    (out_dir / "tokenizer_config.json").write_text(json.dumps(OFFICIAL_TOKENIZER_CONFIG))
    return out_dir


def train_byte_level_bpe(out_dir: Path, vocab_size: int = 500) -> Path:
    """A folder with only a `tokenizers` byte-level BPE `tokenizer.json` (no tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = sample_text("kjv")[:100_000]
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    return out_dir

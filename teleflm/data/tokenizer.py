"""Byte-level BPE tokenizer with Tele-FLM's special tokens, trained with the `tokenizers` library.

Byte-level with no normalizer: any UTF-8 text (CJK, code, emoji, control characters) decodes back to
exactly the same bytes. Saved as a transformers fast tokenizer, so `AutoTokenizer.from_pretrained(DIR)`
loads it.
"""

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

# Ids 0..3 as in the released tokenizer, then the instruct model's chat turn markers.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<_system>", "<_user>", "<_bot>"]
EOS_ID = 2


def train_tokenizer(texts: Iterable[str | Path], vocab_size: int, out_dir: str | Path) -> Path:
    """Train on `texts` (strings, and `Path`s of files whose documents teleflm.data.sources reads)
    and save to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=False,  # would change the text: " ." -> "."
    )
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    return out_dir


def _texts(texts) -> Iterator[str]:
    from teleflm.data.sources import read_documents

    for item in texts:
        if isinstance(item, Path):
            yield from read_documents(Path(item))
        else:
            yield item


def load_tokenizer(folder: str | Path):
    from teleflm.model.io import load_tokenizer as load

    return load(folder)


def tokenizer_hash(folder: str | Path) -> str:
    """Identity of a tokenizer: sha256 of its tokenizer.json (what encoding depends on)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_tokenizer(folder: str | Path):
    """The Rust `tokenizers.Tokenizer` (multithreaded `encode_batch`, no per-call Python overhead)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))

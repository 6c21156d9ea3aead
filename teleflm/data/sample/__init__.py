"""The embedded sample: public-domain English (the King James Bible) and classical Chinese (Tang and
Song poems) shipped compressed in this folder, and Python code collected at run time from the
standard library's own sources. Three domains with a mixture table, for the demo and tests."""

import json
import sysconfig
from importlib.resources import files
from pathlib import Path

import zstandard

MAX_CODE_FILES = 400
MAX_CODE_FILE_BYTES = 48_000


def _shipped(name: str) -> str:
    return zstandard.ZstdDecompressor().decompress((files(__package__) / name).read_bytes()).decode()


def kjv_chapters() -> list[str]:
    """One document per chapter: its heading ("Genesis 1") and verses."""
    blocks = [b.strip("\n") for b in _shipped("kjv.txt.zst").split("\n\n")]
    return [
        f"{head}\n\n{body}" for head, body in zip(blocks[::2], blocks[1::2], strict=False) if body.strip()
    ]


def kjv_windows(n_chars: int = 1_500_000, vocab_size: int = 1024, context: int = 64):
    """The first `n_chars` of the KJV as packed (n, context + 1) token windows in a fixed shuffled
    order (so any leading slice, such as a held-out split, comes from the whole book), with a
    byte-level BPE of `vocab_size` trained on that text: data for short muP runs that needs no
    prepared shards."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = "\n\n".join(kjv_chapters())[:n_chars]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        text.splitlines(),
        trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    ids = np.array([i for line in tok.encode_batch(text.splitlines()) for i in line.ids], dtype=np.int64)
    n = len(ids) // (context + 1)
    windows = ids[: n * (context + 1)].reshape(n, context + 1)
    return windows[np.random.default_rng(0).permutation(n)]


def poems() -> list[str]:
    """One document per poem (title, author line, verses); the source separates them with '%'."""
    return [p.strip("\n") for p in _shipped("poems.txt.zst").split("\n%\n") if p.strip()]


def stdlib_sources() -> list[str]:
    """Python standard library modules (not its tests), in path order: at most MAX_CODE_FILES
    non-empty files of at most MAX_CODE_FILE_BYTES each."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    texts = []
    for path in paths:
        data = path.read_bytes()
        if data.strip() and len(data) <= MAX_CODE_FILE_BYTES:
            try:
                texts.append(data.decode())
            except UnicodeDecodeError:
                continue
        if len(texts) == MAX_CODE_FILES:
            break
    return texts


DOMAINS = {  # name: (documents, proportion, epochs)
    "book_en": (kjv_chapters, 0.5, 2.0),
    "poetry_zh": (poems, 0.2, 8.0),
    "code": (stdlib_sources, 0.3, 2.0),
}


def write_sample_corpus(out_dir: str | Path) -> Path:
    """Write the three domains as JSONL and a `data.toml` for `teleflm data prepare`; returns it."""
    out_dir = Path(out_dir)
    lines = ['tokenizer = "../tokenizer"', 'out = "../shards"', "heldout_fraction = 0.05", "seed = 1234", ""]
    for name, (documents, proportion, epochs) in DOMAINS.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        with (out_dir / name / f"{name}.jsonl").open("w") as f:
            for text in documents():
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        lines += [
            "[[domains]]",
            f'name = "{name}"',
            f'inputs = ["{name}/*.jsonl"]',
            f"proportion = {proportion}",
            f"epochs = {epochs}",
            "",
        ]
    path = out_dir / "data.toml"
    path.write_text("\n".join(lines))
    return path

"""Byte-level BPE tokenizer with Tele-FLM's special tokens, trained with the `tokenizers` library.

Byte-level with no normalizer: any UTF-8 text (CJK, code, emoji, control characters) decodes back to
exactly the same bytes. Saved as a transformers fast tokenizer, so `AutoTokenizer.from_pretrained(DIR)`
loads it.
"""

import hashlib
import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# The instruct model's chat turn markers, one per role.
ROLE_MARKERS = {"system": "<_system>", "user": "<_user>", "assistant": "<_bot>"}
# Ids 0..3 as in the released tokenizer, then the turn markers.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", *ROLE_MARKERS.values()]
EOS_ID = 2
PAD_ID = 3

# The instruct format: each turn opens with its role's marker, an assistant turn ends with </s> (where
# generation stops), and the generation prompt is the assistant's marker. No spaces or newlines are
# added around contents, so a conversation tokenizes turn by turn exactly as it does whole
# (teleflm.sft.template renders the same ids with a loss mask; a test checks the two agree).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    f"{{%- if message['role'] == 'system' -%}}{{{{ '{ROLE_MARKERS['system']}' + message['content'] }}}}"
    f"{{%- elif message['role'] == 'user' -%}}{{{{ '{ROLE_MARKERS['user']}' + message['content'] }}}}"
    f"{{%- elif message['role'] == 'assistant' -%}}{{{{ '{ROLE_MARKERS['assistant']}' + message['content'] + '</s>' }}}}"
    "{%- else -%}{{ raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{{{{ '{ROLE_MARKERS['assistant']}' }}}}{{%- endif -%}}"
)


def train_tokenizer(
    files_or_texts: list[str | Path] | Iterable[str], vocab_size: int, out_dir: str | Path
) -> Path:
    """Train a byte-level BPE of `vocab_size` entries and save it to `out_dir` (returned).

    `files_or_texts` is either a list (or tuple) of files or globs, read as documents by
    teleflm.data.sources (any format `teleflm data prepare` reads), or any other iterable of texts
    (a generator, `iter(list_of_texts)`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is below the 256 bytes + {len(SPECIAL_TOKENS)} special tokens"
        )
    if isinstance(files_or_texts, str | Path):
        raise TypeError(
            "train_tokenizer takes a list of files or globs, or an iterable of texts, not one string"
        )
    from_files = isinstance(files_or_texts, list | tuple)
    texts = _file_texts(files_or_texts) if from_files else files_or_texts
    seen = _Seen()
    # No normalizer: every byte of the text must survive. The pre-tokenizer maps bytes to printable
    # characters, so the 256 of them are the base alphabet and any text encodes without <unk>.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(seen.count(texts), trainer=trainer)
    source = ", ".join(map(str, files_or_texts)) if from_files else "the texts"
    seen.check(source, tokenizer.get_vocab_size(), vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=False,  # would change the text: " ." -> "."
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    return out_dir


@dataclass
class _Seen:
    """What a tokenizer was trained on, to refuse empty input and warn on degenerate input."""

    chars: int = 0
    replaced: int = 0  # U+FFFD: invalid UTF-8 in a file (teleflm.data.sources replaces it)

    def count(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            self.chars += len(text)
            self.replaced += text.count("\ufffd")
            yield text

    def check(self, source: str, size: int, vocab_size: int) -> None:
        if self.chars == 0:
            raise ValueError(f"{source}: no text to train a tokenizer on")
        if self.replaced > 0.01 * self.chars:
            warnings.warn(
                f"{source}: {self.replaced / self.chars:.0%} of the characters are invalid UTF-8 (replaced "
                "by U+FFFD): is it text? The tokenizer learns merges of noise",
                stacklevel=3,
            )
        if size < vocab_size:
            warnings.warn(
                f"{source}: the tokenizer has {size} entries, not the {vocab_size} asked: the input holds "
                "too little text to learn more merges",
                stacklevel=3,
            )


def expand_files(patterns: list[str | Path]) -> list[Path]:
    """Files named by paths or globs, each pattern's matches sorted; a pattern matching nothing is an error."""
    import glob

    files: list[Path] = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"{pattern}: matches no file")
        files += [f for f in found if f not in files]
    return files


def _file_texts(patterns: list[str | Path]) -> Iterator[str]:
    from teleflm.data.sources import read_documents

    for path in expand_files(patterns):  # expanded before training starts: a bad name fails at once
        yield from read_documents(path)


def has_tokenizer(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def load_tokenizer(folder: str | Path):
    """The tokenizer of a folder: fast `tokenizer.json` if present, else the SentencePiece
    `tokenizer.model` (converted by transformers' LlamaTokenizer: byte fallback, no BOS unless
    tokenizer_config.json says so). The class named by tokenizer_config.json is used when it is one
    of transformers' own; a custom class (which would need remote code) is never imported."""
    import transformers
    from transformers import LlamaTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        fallback = PreTrainedTokenizerFast
    elif (folder / "tokenizer.model").is_file():
        fallback = LlamaTokenizer
    else:
        raise FileNotFoundError(f"{folder}: no tokenizer (expected tokenizer.json or tokenizer.model)")
    config_path = folder / "tokenizer_config.json"
    named = json.loads(config_path.read_text()).get("tokenizer_class") if config_path.is_file() else None
    cls = getattr(transformers, named, None) if named else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase)):
        cls = fallback
    return cls.from_pretrained(str(folder), local_files_only=True)


def padded_ids(tokenizer, vocab_size: int) -> list[int]:
    """The embedding rows past the tokenizer (model `vocab_size` over its entries): never to be
    generated (`suppress_tokens`) nor given probability mass."""
    return list(range(len(tokenizer), vocab_size))


def real_vocab_size(source) -> int:
    """How many ids the tokenizer can produce, from a tokenizer or a folder holding one. The
    embedding may be padded past it (80,000 entries, 80,384 rows in Tele-FLM 52B): ids from here to
    `config.vocab_size` are padding and must be masked out of any softmax (loss, BPB, sampling)."""
    tokenizer = load_tokenizer(source) if isinstance(source, (str, Path)) else source
    return len(tokenizer)


def add_chat_template(tokenizer) -> bool:
    """Give `tokenizer` the instruct chat template when it has the three turn markers and no template
    of its own (tokenizers trained before the template was saved with them); True when added."""
    markers = SPECIAL_TOKENS[4:]
    has_markers = all(
        tokenizer.convert_tokens_to_ids(m) not in (None, tokenizer.unk_token_id) for m in markers
    )
    if tokenizer.chat_template is None and has_markers:
        tokenizer.chat_template = CHAT_TEMPLATE
        return True
    return False


def tokenizer_hash(folder: str | Path) -> str:
    """Identity of a tokenizer: sha256 of its tokenizer.json (what encoding depends on)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_tokenizer(folder: str | Path):
    """The Rust `tokenizers.Tokenizer` that encodes training data (multithreaded `encode_batch`, no
    per-call Python overhead). Special tokens written in a document ("</s>" in a web page) are
    encoded as the text they are, so the only </s> ids in shards are the separators the mixture adds."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (train one with `teleflm tokenizer train`)")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True
    return tokenizer

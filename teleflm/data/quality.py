"""Quality filters of pre-training text, per domain: length, Gopher-style repetition, character
classes and language.

The repetition rules are those of Gopher (Rae et al. 2021, appendix A): duplicate lines and
paragraphs (by count and by characters), the characters covered by the most frequent 2-, 3- and
4-gram of words, and the characters covered by repeated 5- to 10-grams. Words are runs of letters and
digits, each CJK character a word of its own, lower-cased: the same words the near-duplicate
signatures shingle (teleflm.data.dedup). n-gram counts are computed on 64-bit hashes of the words
with numpy, so a document costs a few passes over its words, not a Python dict per n-gram.

Language identification is py3langid's (its model ships in the package: nothing is downloaded),
run on the first LANGUAGE_CHARS characters.

Every threshold is off at 0 (the default): a domain filters only what its `[domains.filters]` table
asks. A document is dropped by the first filter it fails, in the order of FILTERS, and counted under
that filter's name.
"""

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from teleflm.config import NON_NEGATIVE, ConfigError, Range
from teleflm.data.decontaminate import ngram_hashes

LANGUAGE_CHARS = 2000  # what language identification reads of a document: enough, at a bounded cost

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_LETTER = re.compile(r"[^\W\d_]")
_DIGIT = re.compile(r"\d")
_PUNCTUATION = re.compile(r"[^\w\s]|_")
_SPACE = re.compile(r"\s")
_LINE_BREAKS = re.compile(r"\n+")
_PARAGRAPH_BREAKS = re.compile(r"\n\s*\n")
_SYMBOLS = re.compile(r"#|\.\.\.|\u2026")


def words(text: str) -> list[str]:
    """The document's words: runs of letters and digits, each CJK character alone, lower-cased."""
    return _WORD.findall(text.lower())


def word_hashes(tokens: list[str]) -> np.ndarray:
    """A stable 32-bit hash of each word (crc32 of its UTF-8, the same on every machine and run; each
    distinct word hashed once)."""
    unique = dict.fromkeys(tokens)  # map() and dict() throughout: C loops, no Python code per word
    table = np.fromiter(map(zlib.crc32, map(str.encode, unique)), dtype=np.uint64, count=len(unique))
    ids = dict(zip(unique, range(len(unique)), strict=True))
    return table[np.fromiter(map(ids.__getitem__, tokens), dtype=np.int64, count=len(tokens))]


def _fractions_by_length(table, where: str) -> dict[str, float]:
    """A `{ n = fraction }` table of `[domains.filters]`: n-gram lengths to fractions in [0, 1]."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of n-gram length = fraction, got {table!r}")
    for n, fraction in table.items():
        if not (n.isdigit() and int(n) >= 1 and type(fraction) in (int, float) and 0 <= fraction <= 1):
            raise ConfigError(
                f"{where}: keys are n-gram lengths, values fractions in [0, 1]; got {n} = {fraction!r}"
            )
    return {n: float(fraction) for n, fraction in table.items()}


def _known_languages(languages, where: str) -> list[str]:
    if not isinstance(languages, list) or not all(isinstance(code, str) for code in languages):
        raise ConfigError(f"{where}: expected a list of ISO 639-1 codes, got {languages!r}")
    known = set(_identifier().nb_classes) if languages else set()
    unknown = sorted(set(languages) - known)
    if unknown:
        raise ConfigError(f"{where}: {unknown} not known to py3langid (it knows {sorted(known)})")
    return languages


UNIT = Range(0, 1)


@dataclass
class FilterConfig:
    """A domain's `[domains.filters]` table; 0 leaves a filter off."""

    min_chars: int = 0
    max_chars: int = 0
    min_words: int = 0
    max_words: int = 0
    min_mean_word_length: float = 0.0  # Gopher: 3 (characters; English)
    max_mean_word_length: float = 0.0  # Gopher: 10
    max_symbol_word_ratio: float = 0.0  # "#", "..." and "…" per word; Gopher: 0.1
    max_duplicate_line_fraction: float = 0.0  # lines that repeat an earlier line; Gopher: 0.3
    max_duplicate_line_char_fraction: float = 0.0  # their characters; Gopher: 0.2
    max_duplicate_paragraph_fraction: float = 0.0  # Gopher: 0.3
    max_duplicate_paragraph_char_fraction: float = 0.0  # Gopher: 0.2
    # n -> the most frequent n-gram's share of the word characters; Gopher: {2 = 0.2, 3 = 0.18, 4 = 0.16}
    max_top_ngram_fraction: Annotated[dict, _fractions_by_length] = field(default_factory=dict)
    # n -> share of word characters inside repeated n-grams; Gopher: 5: 0.15, 6: 0.14 ... 10: 0.10
    max_duplicate_ngram_fraction: Annotated[dict, _fractions_by_length] = field(default_factory=dict)
    min_letter_fraction: float = 0.0  # letters among the characters that are not white space
    max_digit_fraction: float = 0.0
    max_punctuation_fraction: float = 0.0  # punctuation and symbols among the non-space characters
    # ISO 639-1 codes kept, e.g. ["en"]; [] keeps all
    languages: Annotated[list, _known_languages] = field(default_factory=list)
    min_language_score: float = 0.5  # the identifier's probability of the best language, with `languages`

    RANGES = {
        **dict.fromkeys(["min_chars", "max_chars", "min_words", "max_words"], NON_NEGATIVE),
        **dict.fromkeys(
            ["min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio"], NON_NEGATIVE
        ),
        **dict.fromkeys(
            [f"max_duplicate_{k}_fraction" for k in ("line", "line_char", "paragraph", "paragraph_char")],
            UNIT,
        ),
        **dict.fromkeys(["min_letter_fraction", "max_digit_fraction", "max_punctuation_fraction"], UNIT),
        "min_language_score": UNIT,
    }

    @property
    def active(self) -> bool:
        return self != FilterConfig()


# The filters in the order they are applied; a dropped document counts under the first that fails.
FILTERS = (
    "min_chars",
    "max_chars",
    "min_words",
    "max_words",
    "mean_word_length",
    "symbol_word_ratio",
    "duplicate_lines",
    "duplicate_paragraphs",
    "top_ngram",
    "duplicate_ngram",
    "letter_fraction",
    "digit_fraction",
    "punctuation_fraction",
    "language",
)

_IDENTIFIER = None


def _identifier():
    """py3langid's identifier with probabilities (its model loads once per process, ~2 s)."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def _duplicates(pieces: list[str]) -> tuple[float, float]:
    """(share of pieces that repeat an earlier one, share of the characters in them)."""
    pieces = [p for p in pieces if p.strip()]
    if not pieces:
        return 0.0, 0.0
    seen: set[str] = set()
    count = chars = 0
    for piece in pieces:
        if piece in seen:
            count += 1
            chars += len(piece)
        seen.add(piece)
    return count / len(pieces), chars / max(sum(map(len, pieces)), 1)


def _ngram_fractions(hashes: np.ndarray, lengths: np.ndarray, n: int) -> tuple[float, float]:
    """(the most frequent n-gram's characters times its count, the characters of words inside an
    n-gram seen earlier in the document), each as a share of all word characters."""
    total = int(lengths.sum())
    grams = ngram_hashes(hashes, n)
    if len(grams) == 0 or total == 0:
        return 0.0, 0.0
    _, first, inverse, counts = np.unique(grams, return_index=True, return_inverse=True, return_counts=True)
    top = int(np.argmax(counts))
    window_chars = np.convolve(lengths, np.ones(n, dtype=np.int64), mode="valid")
    top_share = int(counts[top]) * int(window_chars[first[top]]) / total
    repeat = np.flatnonzero(first[inverse] != np.arange(len(grams)))  # windows that occurred before
    covered = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.add.at(covered, repeat, 1)
    np.add.at(covered, repeat + n, -1)
    inside = np.cumsum(covered[:-1]) > 0
    return top_share, int(lengths[inside].sum()) / total


class QualityFilter:
    """A domain's filters: `verdict(text)` is the name of the first filter the document fails, or None."""

    def __init__(self, config: FilterConfig):
        self.c = config
        self.active = config.active
        self.top = {int(n): float(v) for n, v in config.max_top_ngram_fraction.items()}
        self.dup = {int(n): float(v) for n, v in config.max_duplicate_ngram_fraction.items()}

    def verdict(self, text: str, tokens: list[str] | None = None) -> str | None:
        """`tokens`: the document's `words`, when the caller has them already."""
        c = self.c
        if not self.active:
            return None
        if c.min_chars and len(text) < c.min_chars:
            return "min_chars"
        if c.max_chars and len(text) > c.max_chars:
            return "max_chars"
        tokens = words(text) if tokens is None else tokens
        if c.min_words and len(tokens) < c.min_words:
            return "min_words"
        if c.max_words and len(tokens) > c.max_words:
            return "max_words"
        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        if c.min_mean_word_length or c.max_mean_word_length:
            mean = float(lengths.mean()) if len(lengths) else 0.0
            if mean < c.min_mean_word_length or (c.max_mean_word_length and mean > c.max_mean_word_length):
                return "mean_word_length"
        if c.max_symbol_word_ratio and len(_SYMBOLS.findall(text)) > c.max_symbol_word_ratio * max(
            len(tokens), 1
        ):
            return "symbol_word_ratio"
        if c.max_duplicate_line_fraction or c.max_duplicate_line_char_fraction:
            count, chars = _duplicates(_LINE_BREAKS.split(text))
            if _over(count, c.max_duplicate_line_fraction) or _over(
                chars, c.max_duplicate_line_char_fraction
            ):
                return "duplicate_lines"
        if c.max_duplicate_paragraph_fraction or c.max_duplicate_paragraph_char_fraction:
            count, chars = _duplicates(_PARAGRAPH_BREAKS.split(text))
            if _over(count, c.max_duplicate_paragraph_fraction) or _over(
                chars, c.max_duplicate_paragraph_char_fraction
            ):
                return "duplicate_paragraphs"
        if self.top or self.dup:
            hashes = word_hashes(tokens)
            for n in sorted(set(self.top) | set(self.dup)):
                top, repeated = _ngram_fractions(hashes, lengths, n)
                if n in self.top and top > self.top[n]:
                    return "top_ngram"
                if n in self.dup and repeated > self.dup[n]:
                    return "duplicate_ngram"
        if c.min_letter_fraction or c.max_digit_fraction or c.max_punctuation_fraction:
            visible = max(len(text) - _SPACE.subn("", text)[1], 1)
            if c.min_letter_fraction and _LETTER.subn("", text)[1] < c.min_letter_fraction * visible:
                return "letter_fraction"
            if _over(_DIGIT.subn("", text)[1] / visible, c.max_digit_fraction):
                return "digit_fraction"
            if _over(_PUNCTUATION.subn("", text)[1] / visible, c.max_punctuation_fraction):
                return "punctuation_fraction"
        if c.languages:
            language, score = _identifier().classify(text[:LANGUAGE_CHARS])
            if language not in c.languages or score < c.min_language_score:
                return "language"
        return None


def _over(value: float, limit: float) -> bool:
    return bool(limit) and value > limit


def count_verdicts(verdicts: list[str | None]) -> dict[str, int]:
    """Documents dropped per filter name, in FILTERS order (names with none left out)."""
    counts = Counter(v for v in verdicts if v is not None)
    return {name: counts[name] for name in FILTERS if counts[name]}

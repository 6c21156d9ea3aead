"""Chat data for supervised fine-tuning: read, check, truncate, decontaminate, pack, stream.

Input: JSONL files, one conversation per line: `{"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]}`. A system message may only come first; a conversation needs
at least one assistant message; contents are strings (a special token written in one is text, never
a marker: teleflm.sft.template).

- Malformed lines (not JSON, wrong shape, misplaced system message, no assistant message) are named
  by file and line number, then skipped (`on_error = "skip"`, counted) or refused (`"fail"`, the
  first one stops the run).
- Unknown roles are always refused with file:line, whatever `on_error` says: they mean the file uses
  another schema ("human"/"gpt", ...), and skipping would silently drop the whole set.
- Truncation, for a conversation longer than one sequence (context_length + 1 tokens): its oldest
  exchanges (a user turn and the assistant turns that answer it) are dropped, the system message
  kept, until the rest fits; if the last exchange alone is too long it is cut at the end (its answer
  then has no `</s>`). A conversation left with no assistant token is dropped. All three are counted.
- Packing: conversations are placed into sequences best-fit by decreasing length; each one is its
  own document (doc_ids) so attention stays inside it, the rest of a sequence is padding. Without
  packing each sequence holds one conversation.
"""

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from teleflm.data.tokenizer import expand_files
from teleflm.sft.template import ROLES, ChatFormat, Turn


class ChatDataError(ValueError):
    """Input that cannot be fine-tuned on; the message names the file and line."""


@dataclass
class Conversation:
    messages: list[dict]
    where: str  # file:line


@dataclass
class ChatDataReport:
    """What reading and preparing the set did, for the run's log (`sft_data.json`)."""

    files: list[str] = field(default_factory=list)
    conversations: int = 0  # read and valid
    skipped_lines: list[str] = field(default_factory=list)  # "file:line: reason"
    dropped_old_turns: int = 0  # conversations that lost their oldest exchanges to fit
    cut_at_end: int = 0  # conversations whose last exchange was cut at the context
    dropped_no_target: int = 0  # conversations left without an assistant token after truncation
    contaminated: int = 0  # conversations removed for sharing an n-gram with an eval set
    sequences: int = 0  # packed sequences of context_length + 1 tokens
    tokens: int = 0  # conversation tokens in them (not padding)
    target_tokens: int = 0  # of which learned (assistant)
    fill: float = 0.0  # tokens / (sequences x (context_length + 1))


def expand(patterns: list[str]) -> list[Path]:
    try:
        return expand_files(patterns)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"sft.data {e}") from None


def check_messages(record) -> str | None:
    """Why a parsed line is not a conversation (None when it is one). Unknown roles raise."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return 'expected an object with a "messages" list'
    messages = record["messages"]
    if not messages:
        return "no messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i} is not an object with a string role"
        if message["role"] not in ROLES:
            raise ChatDataError(
                f"message {i} has unknown role {message['role']!r} (expected one of {', '.join(ROLES)})"
            )
        if not isinstance(message.get("content"), str):
            return f"message {i} ({message['role']}) has no string content"
        if message["role"] == "system" and i > 0:
            return f"message {i}: a system message may only come first"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message (nothing to learn)"
    return None


def read_jsonl(patterns: list[str], check, on_error: str, section: str, report) -> list[tuple[str, object]]:
    """(file:line, value) for each line of the JSONL files (paths or globs) that `check` accepts:
    `check(record)` returns the value, or a string saying what is wrong with the record. A bad line
    fails naming its file and line, or with `on_error = "skip"` is listed in `report.skipped_lines`."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    accepted = []
    for path in expand(patterns):
        report.files.append(str(path))
        with path.open(encoding="utf-8", errors="strict") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    result = check(json.loads(line))
                except json.JSONDecodeError as e:
                    result = f"not valid JSON ({e.msg} at column {e.colno})"
                except ChatDataError as e:
                    raise ChatDataError(f"{where}: {e}") from None
                if not isinstance(result, str):
                    accepted.append((where, result))
                elif on_error == "fail":
                    raise ChatDataError(
                        f'{where}: {result} (set {section}.on_error = "skip" to skip such lines)'
                    )
                else:
                    report.skipped_lines.append(f"{where}: {result}")
    return accepted


def read_conversations(
    patterns: list[str], on_error: str = "fail", report: ChatDataReport | None = None
) -> list[Conversation]:
    """The conversations of JSONL files (paths or globs); see the module's rules for bad lines."""
    report = report if report is not None else ChatDataReport()

    def check(record):
        return check_messages(record) or record["messages"]

    lines = read_jsonl(patterns, check, on_error, "sft", report)
    conversations = [Conversation(messages, where) for where, messages in lines]
    report.conversations = len(conversations)
    return conversations


def exchanges(turns: list[Turn]) -> tuple[list[Turn], list[list[Turn]]]:
    """(leading system turn or nothing, exchanges): an exchange is a user turn and the turns up to the
    next user turn; turns before the first user turn belong to the first exchange."""
    head = turns[:1] if turns[0].role == "system" else []
    groups: list[list[Turn]] = []
    for turn in turns[len(head) :]:
        if turn.role == "user" or not groups:
            groups.append([])
        groups[-1].append(turn)
    return head, groups


def fit(turns: list[Turn], limit: int, report: ChatDataReport) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, loss mask) of a conversation truncated to `limit` tokens by the module's rule, or None
    when nothing learnable is left."""
    head, groups = exchanges(turns)
    size = sum(len(t.ids) for t in turns)
    if size > limit:
        report.dropped_old_turns += len(groups) > 1
        while len(groups) > 1 and size > limit:
            size -= sum(len(t.ids) for t in groups.pop(0))
    kept = head + [t for group in groups for t in group]
    ids = np.concatenate([t.ids for t in kept])
    target = np.concatenate([t.target for t in kept])
    if len(ids) > limit:
        report.cut_at_end += 1
        ids, target = ids[:limit], target[:limit]
    if not target.any():
        report.dropped_no_target += 1
        return None
    return ids, target


@dataclass
class PackedSet:
    """Sequences of context_length + 1 tokens ready for the trainer."""

    tokens: np.ndarray  # int64 [n, T + 1]
    loss_mask: np.ndarray  # bool [n, T + 1]: token t is a learned target (predicted at t - 1)
    doc_ids: np.ndarray  # int32 [n, T + 1]: conversation index within the row (padding: its own)


def pack(
    conversations: list[tuple[np.ndarray, np.ndarray]], context_length: int, pad_id: int, packing: bool
) -> PackedSet:
    """Best-fit decreasing: longest first, each into the fullest sequence it still fits in."""
    width = context_length + 1
    order = sorted(range(len(conversations)), key=lambda i: -len(conversations[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row), sorted
    for i in order:
        n = len(conversations[i][0])
        slot = bisect.bisect_left(free, (n, -1)) if packing else len(free)
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = width, len(rows)
            rows.append([])
        rows[row].append(i)
        if packing and room - n > 0:
            bisect.insort(free, (room - n, row))
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    loss_mask = np.zeros((len(rows), width), dtype=bool)
    doc_ids = np.zeros((len(rows), width), dtype=np.int32)
    for r, members in enumerate(rows):
        position = 0
        for d, i in enumerate(members):
            ids, target = conversations[i]
            tokens[r, position : position + len(ids)] = ids
            loss_mask[r, position : position + len(ids)] = target
            doc_ids[r, position : position + len(ids)] = d
            position += len(ids)
        doc_ids[r, position:] = len(members)
    return PackedSet(tokens, loss_mask, doc_ids)


def contaminated(
    rendered: list[tuple[np.ndarray, np.ndarray]],
    eval_sets: list[str],
    tokenizer_dir,
    ngram: int,
    text_field: str,
) -> np.ndarray:
    """Which conversations share an `ngram`-token window with an eval set (teleflm.data.decontaminate)."""
    from teleflm.data.decontaminate import load_test_ngrams
    from teleflm.data.tokenizer import raw_tokenizer

    index = load_test_ngrams(eval_sets, raw_tokenizer(tokenizer_dir), ngram, text_field)
    if not rendered:
        return np.zeros(0, dtype=bool)
    lengths = [len(ids) for ids, _ in rendered]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return index.contaminated(np.concatenate([ids for ids, _ in rendered]), offsets)


def prepare_chat_data(
    patterns: list[str],
    tokenizer,
    tokenizer_dir,
    context_length: int,
    on_error: str = "fail",
    packing: bool = True,
    eval_sets: list[str] = (),
    ngram: int = 13,
    text_field: str = "text",
) -> tuple[PackedSet, ChatDataReport]:
    """Read, render, truncate, decontaminate and pack a chat set (the whole path of `teleflm sft`)."""
    report = ChatDataReport()
    chat = ChatFormat(tokenizer)
    rendered = []
    for conversation in read_conversations(patterns, on_error, report):
        fitted = fit(chat.turns(conversation.messages), context_length + 1, report)
        if fitted is not None:
            rendered.append(fitted)
    if eval_sets:
        dirty = contaminated(rendered, list(eval_sets), tokenizer_dir, ngram, text_field)
        report.contaminated = int(dirty.sum())
        rendered = [r for r, bad in zip(rendered, dirty, strict=True) if not bad]
    if not rendered:
        raise ChatDataError(f"{', '.join(patterns)}: no conversation left to train on")
    packed = pack(rendered, context_length, tokenizer.pad_token_id, packing)
    report.sequences = len(packed.tokens)
    report.tokens = sum(len(ids) for ids, _ in rendered)
    report.target_tokens = int(packed.loss_mask.sum())
    report.fill = report.tokens / packed.tokens.size
    return packed, report


class EpochStream:
    """Items 0..n-1 epoch after epoch, each epoch in a seeded order; global item g goes to
    data-parallel rank g % dp_size. State: items drawn, all ranks together (a few integers)."""

    def __init__(self, n: int, seed: int, dp_rank: int = 0, dp_size: int = 1):
        self.n, self.seed = n, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.drawn = 0
        self._orders: dict[int, np.ndarray] = {}

    def _item(self, g: int) -> int:
        epoch, index = divmod(g, self.n)
        if epoch not in self._orders:  # this epoch's order, and the last one's for a batch across them
            self._orders = {e: order for e, order in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return int(self._orders[epoch][index])

    def take(self, n: int) -> list[int]:
        """This rank's next `n` items."""
        items = [self._item(self.drawn + self.dp_rank + i * self.dp_size) for i in range(n)]
        self.drawn += n * self.dp_size
        return items

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        if state["drawn"] % self.dp_size:
            raise ValueError(
                f"stream state at {state['drawn']} items does not divide over {self.dp_size} ranks"
            )
        self.drawn = int(state["drawn"])


class PackedStream(EpochStream):
    """The trainer's stream over a packed set: its sequences, epoch after epoch (EpochStream)."""

    def __init__(self, packed: PackedSet, seed: int, dp_rank: int = 0, dp_size: int = 1):
        super().__init__(len(packed.tokens), seed, dp_rank, dp_size)
        self.packed = packed

    def next_sequences(self, n: int) -> dict:
        rows = self.take(n)
        return {
            "tokens": self.packed.tokens[rows],
            "domain": np.zeros(n, dtype=np.int64),
            "loss_mask": self.packed.loss_mask[rows],
            "doc_ids": self.packed.doc_ids[rows],
        }

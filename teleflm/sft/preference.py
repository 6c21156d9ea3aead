"""Preference data and the DPO objective (`teleflm dpo`, docs/sft.md).

Input: JSONL files, one pair per line, in trl's preference format: `{"prompt": [messages], "chosen":
[assistant messages], "rejected": [assistant messages]}`, where a plain string stands for one user
(prompt) or assistant (responses) message. Each side is rendered with the chat format of `teleflm sft`
(prompt + response); the loss mask marks the response's tokens only. Lines are checked like SFT's
(file:line, `on_error`); a pair whose longer side exceeds one sequence is dropped and counted.

DPO (Rafailov et al. 2023): with per-sequence log-probabilities of the response under the policy
(`logp`) and under the frozen starting model (`ref`), the loss of a pair is
`-log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r)))`. The reference log-probabilities are
computed once, before the first step, and saved with the run.
"""

from dataclasses import dataclass, field

import numpy as np

from teleflm.sft.data import ChatDataError, EpochStream, check_messages, read_jsonl
from teleflm.sft.template import ChatFormat

SIDES = ("chosen", "rejected")


@dataclass
class PreferenceReport:
    files: list[str] = field(default_factory=list)
    pairs: int = 0  # read and valid
    skipped_lines: list[str] = field(default_factory=list)  # "file:line: reason"
    too_long: int = 0  # pairs dropped because a side exceeds context_length + 1 tokens
    heldout: int = 0  # pairs kept aside for evaluation
    train: int = 0  # pairs trained on


@dataclass
class PairSet:
    """Pairs as rows of context_length + 1 tokens: side 0 chosen, side 1 rejected."""

    tokens: np.ndarray  # int64 [pairs, 2, T + 1]
    loss_mask: np.ndarray  # bool [pairs, 2, T + 1]: the response's tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def subset(self, index: np.ndarray) -> "PairSet":
        return PairSet(self.tokens[index], self.loss_mask[index])


def as_messages(value, role: str) -> list[dict] | None:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return value if isinstance(value, list) else None


def check_pair(record) -> tuple[list[dict], list[dict], list[dict]] | str:
    """(prompt, chosen, rejected) messages of a parsed line, or why it is not a pair."""
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", *SIDES)):
        return 'expected an object with "prompt", "chosen" and "rejected"'
    prompt = as_messages(record["prompt"], "user")
    if not prompt or prompt[-1].get("role") != "user":
        return "the prompt must be a string or messages ending with a user message"
    sides = []
    for side in SIDES:
        messages = as_messages(record[side], "assistant")
        if not messages or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in messages):
            return f'"{side}" must be a string or assistant messages'
        problem = check_messages({"messages": prompt + messages})
        if problem is not None:
            return f"{side}: {problem}"
        sides.append(messages)
    return prompt, *sides


def read_pairs(patterns: list[str], on_error: str, report: PreferenceReport) -> list[tuple]:
    pairs = [pair for _, pair in read_jsonl(patterns, check_pair, on_error, "dpo", report)]
    report.pairs = len(pairs)
    return pairs


def render_side(chat: ChatFormat, prompt: list[dict], response: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss mask) of prompt + response, the mask on the response's learned tokens only."""
    prompt_length = sum(len(t.ids) for t in chat.turns(prompt))
    ids, mask = chat.render(prompt + response)
    mask[:prompt_length] = False
    return ids, mask


def prepare_pairs(
    patterns: list[str], tokenizer, context_length: int, on_error: str = "fail"
) -> tuple[PairSet, PreferenceReport]:
    report = PreferenceReport()
    chat = ChatFormat(tokenizer)
    width = context_length + 1
    rendered = []
    for prompt, chosen, rejected in read_pairs(patterns, on_error, report):
        sides = [render_side(chat, prompt, response) for response in (chosen, rejected)]
        if max(len(ids) for ids, _ in sides) > width:
            report.too_long += 1
            continue
        rendered.append(sides)
    if not rendered:
        raise ChatDataError(f"{', '.join(patterns)}: no preference pair left to train on")
    tokens = np.full((len(rendered), 2, width), tokenizer.pad_token_id, dtype=np.int64)
    loss_mask = np.zeros((len(rendered), 2, width), dtype=bool)
    for i, sides in enumerate(rendered):
        for s, (ids, mask) in enumerate(sides):
            tokens[i, s, : len(ids)], loss_mask[i, s, : len(ids)] = ids, mask
    return PairSet(tokens, loss_mask), report


def split_heldout(pairs: PairSet, fraction: float, seed: int) -> tuple[PairSet, PairSet]:
    """(train, held-out): a seeded `fraction` of the pairs (at least one when fraction > 0) held out."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    n = min(len(pairs) - 1, max(1, round(fraction * len(pairs)))) if fraction > 0 else 0
    return pairs.subset(np.sort(order[n:])), pairs.subset(np.sort(order[:n]))


class PairStream(EpochStream):
    """The trainer's stream over pairs, epoch after epoch (EpochStream): a batch of n rows holds n / 2
    pairs, each as its chosen row then its rejected row, with their reference log-probabilities."""

    def __init__(self, pairs: PairSet, ref_logps: np.ndarray, seed: int, dp_rank: int = 0, dp_size: int = 1):
        super().__init__(len(pairs), seed, dp_rank, dp_size)
        self.pairs, self.ref_logps = pairs, ref_logps

    def next_sequences(self, n: int) -> dict:
        if n % 2:
            raise ValueError(f"a DPO batch holds whole pairs: {n} rows per rank is odd")
        index = self.take(n // 2)
        return {
            "tokens": self.pairs.tokens[index].reshape(n, -1),
            "loss_mask": self.pairs.loss_mask[index].reshape(n, -1),
            "ref_logps": self.ref_logps[index].reshape(n),
            "domain": np.zeros(n, dtype=np.int64),
        }

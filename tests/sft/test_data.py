"""Chat data: bad lines, unknown roles, truncation, packing, decontamination."""

import json
import re

import numpy as np
import pytest

from teleflm.data.tokenizer import load_tokenizer
from teleflm.sft.data import (
    ChatDataError,
    ChatDataReport,
    PackedStream,
    prepare_chat_data,
    read_conversations,
)
from teleflm.sft.template import ChatFormat


def chat(user: str, answer: str, system: str = "") -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "messages": [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


def write_lines(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


BAD_LINES = [
    ('{"messages": [', "not valid JSON"),
    ({"text": "no messages"}, 'expected an object with a "messages" list'),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant message"),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        "message 0 (user) has no string content",
    ),
    (
        {"messages": [chat("a", "b")["messages"][0], {"role": "system", "content": "late"}]},
        "message 1: a system message may only come first",
    ),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_malformed_line_is_named_and_refused_or_skipped(tmp_path, line, reason):
    path = write_lines(tmp_path / "chat.jsonl", [chat("q1", "a1"), "", line, chat("q2", "a2")])
    with pytest.raises(ChatDataError, match=re.escape(f"chat.jsonl:3: {reason}")):
        read_conversations([path], on_error="fail")
    report = ChatDataReport()
    conversations = read_conversations([path], on_error="skip", report=report)
    assert [c.where.rsplit(":", 1)[1] for c in conversations] == ["1", "4"]
    assert len(report.skipped_lines) == 1 and report.skipped_lines[0].startswith(f"{path}:3: {reason}")


def test_unknown_role_is_refused_even_when_skipping(tmp_path):
    line = {"messages": [{"role": "human", "content": "q"}, {"role": "gpt", "content": "a"}]}
    path = write_lines(tmp_path / "chat.jsonl", [chat("q", "a"), line])
    with pytest.raises(ChatDataError, match=r"chat\.jsonl:2: message 0 has unknown role 'human'"):
        read_conversations([path], on_error="skip")


def test_truncation_drops_oldest_exchanges_then_cuts_the_end(tmp_path, chat_tokenizer_dir):
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    format = ChatFormat(tokenizer)
    long_turns = {
        "messages": [
            {"role": "system", "content": "Describe it."},
            {"role": "user", "content": "red cat " * 10},
            {"role": "assistant", "content": "A cat that is red. " * 10},
            {"role": "user", "content": "blue dog"},
            {"role": "assistant", "content": "A dog that is blue."},
        ]
    }
    last = [long_turns["messages"][i] for i in (0, 3, 4)]
    one_long_answer = chat("red cat", "A cat that is red. " * 30, system="Describe it.")
    prompt_too_long = chat("red cat " * 60, "A cat.")
    fits = chat("red cat", "A cat that is red.")
    path = write_lines(tmp_path / "chat.jsonl", [long_turns, one_long_answer, prompt_too_long, fits])
    context = 47  # sequences of 48 tokens
    packed, report = prepare_chat_data([path], tokenizer, chat_tokenizer_dir, context, packing=False)

    assert (report.conversations, report.dropped_old_turns, report.cut_at_end, report.dropped_no_target) == (
        4,
        1,
        2,  # the long answer, and the prompt cut before its answer
        1,  # ... which is then dropped
    )
    assert report.sequences == 3
    rows = {tuple(row[row != tokenizer.pad_token_id]) for row in packed.tokens}
    assert tuple(format.render(last)[0]) in rows  # the system message and the last exchange are kept
    assert tuple(format.render(fits["messages"])[0]) in rows
    cut = format.render(one_long_answer["messages"])[0][: context + 1]
    assert tuple(cut) in rows  # the beginning kept, the end (and its </s>) cut


def test_packing_keeps_conversations_apart(tmp_path, chat_tokenizer_dir):
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    pairs = [("red cat", "A cat that is red."), ("blue dog", "A dog that is blue."), ("pink fish", "A fish.")]
    path = write_lines(tmp_path / "chat.jsonl", [chat(q, a) for q, a in pairs])
    packed, report = prepare_chat_data([path], tokenizer, chat_tokenizer_dir, 63, packing=True)
    assert report.sequences == 1 and report.target_tokens == packed.loss_mask.sum()
    row, docs, mask = packed.tokens[0], packed.doc_ids[0], packed.loss_mask[0]
    format = ChatFormat(tokenizer)
    found = []
    for d in np.unique(docs):
        ids = row[docs == d]
        if ids[0] != tokenizer.pad_token_id:
            found.append(tokenizer.decode(ids[mask[docs == d]], skip_special_tokens=True))
            assert ids[0] == format.marker_ids["user"]  # each document starts at its own first turn
    assert sorted(found) == sorted(a for _, a in pairs)
    assert not mask[row == tokenizer.pad_token_id].any()

    stream = PackedStream(packed, seed=0, dp_rank=1, dp_size=2)
    batch = stream.next_sequences(2)
    assert set(batch) == {"tokens", "domain", "loss_mask", "doc_ids"} and stream.state_dict() == {"drawn": 4}


def test_decontamination_drops_conversations_that_overlap_an_eval_set(tmp_path, chat_tokenizer_dir):
    tokenizer = load_tokenizer(chat_tokenizer_dir)
    leaked = "red cat blue dog pink fish grey goat white horse black bird brown sheep green mouse"
    path = write_lines(tmp_path / "chat.jsonl", [chat("q", leaked), chat("red cat", "A cat that is red.")])
    eval_set = write_lines(tmp_path / "eval.jsonl", [{"text": "Question: " + leaked + " and more"}])
    _, report = prepare_chat_data([path], tokenizer, chat_tokenizer_dir, 63, eval_sets=[eval_set], ngram=8)
    assert report.contaminated == 1 and report.conversations == 2

"""The byte-level tokenizer: exact bytes back for any text, the released special ids, loads in transformers."""

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from teleflm.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, raw_tokenizer


def test_special_tokens_have_the_released_ids(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)  # plain transformers loads it
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok("In the beginning")["input_ids"][0] != 1  # no BOS added


def test_corpora_round_trip_byte_exact(tokenizer_dir, texts):
    tok = load_tokenizer(tokenizer_dir)
    for text in texts.values():
        piece = text[:20_000]
        assert tok.decode(tok(piece)["input_ids"]) == piece


ADVERSARIAL = [
    "emoji 👩🏽‍🚀🇨🇳 and ZWJ\u200d joins",
    "control \x00\x01\x1b[31m\x7f chars\r\n\ttabs",
    "combining e\u0301 and lone \u0301 marks, RTL \u202e",
    "  leading and trailing spaces  ",
    "def f(x):\n    return x ** 2  # code\n",
    "混合 English 和中文，标点。",
    "\ufffd replacement char and <_user> markers in text",
]


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_any_text_round_trips(tokenizer_dir, text):
    enc = raw_tokenizer(tokenizer_dir)
    assert enc.decode(enc.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_adversarial_strings_round_trip(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    for text in ADVERSARIAL:
        assert tok.decode(tok(text)["input_ids"]) == text

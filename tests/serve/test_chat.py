"""Chat rendering: the tokenizer's template when it has one, else the instruct turn markers."""

import copy

from teleflm.serve.chat import render_chat

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Who?"},
]


def test_fallback_uses_the_turn_markers(model_and_tokenizer):
    tokenizer = copy.deepcopy(model_and_tokenizer[1])
    tokenizer.chat_template = None
    text = render_chat(tokenizer, MESSAGES)
    assert text == "<_system>Be brief.<_user>Hi<_bot>Hello.</s><_user>Who?<_bot>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    markers = [tokenizer.convert_tokens_to_ids(m) for m in ("<_system>", "<_user>", "<_bot>", "</s>")]
    assert [i for i in ids if i in markers] == [
        markers[0],
        markers[1],
        markers[2],
        markers[3],
        markers[1],
        markers[2],
    ]


def test_the_tokenizers_own_template_wins(model_and_tokenizer):
    tokenizer = copy.deepcopy(model_and_tokenizer[1])
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}>"
    assert render_chat(tokenizer, MESSAGES[:2]) == "[system] Be brief.\n[user] Hi\n>"

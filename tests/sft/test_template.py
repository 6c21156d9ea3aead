"""The chat template: our renderer and `apply_chat_template` in plain transformers agree."""

import json
import subprocess
import sys

import numpy as np
import pytest

from teleflm.data.tokenizer import load_tokenizer
from teleflm.sft.template import ChatFormat

CONVERSATIONS = [
    [{"role": "user", "content": "red cat"}, {"role": "assistant", "content": "A cat that is red."}],
    [
        {"role": "system", "content": "Describe it."},
        {"role": "user", "content": " leading space, trailing newline\n"},
        {"role": "assistant", "content": "床前明月光，疑是地上霜。"},
        {"role": "user", "content": "def f(x):\n\treturn x  # 🙂"},
        {"role": "assistant", "content": ""},
    ],
    [{"role": "assistant", "content": "Hello first."}, {"role": "user", "content": "then a question?"}],
]


def test_renderer_matches_apply_chat_template_in_plain_transformers(chat_tokenizer_dir):
    """A fresh interpreter with only transformers loads the saved tokenizer (AutoTokenizer) and
    renders the conversations; text and ids equal ours, with and without the generation prompt."""
    script = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "out = []\n"
        "for c in json.loads(sys.argv[2]):\n"
        "    for gen in (False, True):\n"
        "        text = t.apply_chat_template(c, tokenize=False, add_generation_prompt=gen)\n"
        "        ids = t.apply_chat_template(c, tokenize=True, add_generation_prompt=gen)\n"
        "        out.append([text, list(ids['input_ids'] if hasattr(ids, 'keys') else ids)])\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(chat_tokenizer_dir), json.dumps(CONVERSATIONS)],
        capture_output=True,
        text=True,
        check=True,
    )
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    chat = ChatFormat(load_tokenizer(chat_tokenizer_dir))
    tokenizer = chat.tokenizer
    for i, conversation in enumerate(CONVERSATIONS):
        ids, _ = chat.render(conversation)
        for j, gen in enumerate((False, True)):
            text, their_ids = theirs[2 * i + j]
            ours = chat.prompt_ids(conversation) if gen else ids.tolist()
            assert their_ids == ours
            assert tokenizer.decode(ours, skip_special_tokens=False) == text


def test_loss_mask_is_assistant_content_and_its_end(chat_tokenizer_dir):
    chat = ChatFormat(load_tokenizer(chat_tokenizer_dir))
    tokenizer = chat.tokenizer
    ids, mask = chat.render(CONVERSATIONS[1])
    learned = tokenizer.decode(ids[mask], skip_special_tokens=False)
    assert learned == "床前明月光，疑是地上霜。</s></s>"  # two answers, the second empty: its </s> only
    assert not np.isin(ids[mask], list(chat.marker_ids.values())).any()
    assert mask.sum() == len(tokenizer("床前明月光，疑是地上霜。", add_special_tokens=False)["input_ids"]) + 2


def test_tokenizer_without_markers_is_refused(tmp_path):
    from teleflm.model.io import load_tokenizer as load
    from tests.model.tiny_tokenizers import train_byte_level_bpe

    folder = train_byte_level_bpe(tmp_path / "plain")
    with pytest.raises(ValueError, match="no <_system> token"):
        ChatFormat(load(folder))

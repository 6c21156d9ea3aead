"""Chat conversations to token ids: the one renderer of `teleflm sft`, `teleflm chat` and `teleflm serve`.

The text is what `tokenizer.apply_chat_template` gives, with teleflm.data.tokenizer.CHAT_TEMPLATE for
the instruct format: `<_system>S<_user>U<_bot>A</s><_user>U2<_bot>A2</s>`. The template's own text is
encoded with its special tokens; each message's content is encoded as the text it is, so a `</s>` or
`<_bot>` written inside a message stays text and can never close or open a turn. Since a special
token always splits the text it sits in, this equals encoding the whole rendered text of ordinary
contents (tests check it against `apply_chat_template` in plain transformers). The loss mask of
fine-tuning marks the tokens the model learns to produce: each assistant turn's content and the
`</s>` that ends it, never the markers, the system prompt or the user's words.
"""

import re
import secrets
from dataclasses import dataclass

import numpy as np

from teleflm.data.tokenizer import CHAT_TEMPLATE, ROLE_MARKERS

ROLES = ("system", "user", "assistant")


def render(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True, template: str | None = None
) -> list[tuple[list[int], int | None]]:
    """A conversation as token ids, in order: (ids, None) for the template's own text, (ids, i) for
    message i's content, encoded as text. `template`: default the tokenizer's chat template, else the
    instruct format. A template may refuse a conversation (an unknown role): jinja's error."""
    template = template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
    # Each content is rendered as a placeholder no text holds, so the template's text splits from it.
    nonce = secrets.token_hex(8)
    stand_ins = [{**m, "content": f"{nonce}{i}{nonce}"} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(
        stand_ins, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    parts = re.split(f"{nonce}(\\d+){nonce}", text)  # template text, message index, template text, ...
    indexes = [int(i) for i in parts[1::2]]
    template_ids = tokenizer(parts[0::2], add_special_tokens=False)["input_ids"]
    contents = [messages[i]["content"] for i in indexes]
    content_ids = (
        tokenizer(contents, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if contents
        else []
    )
    pieces = [(template_ids[0], None)]
    for index, ids, after in zip(indexes, content_ids, template_ids[1:], strict=True):
        pieces += [(ids, index), (after, None)]
    return [(ids, index) for ids, index in pieces if ids]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The ids that ask for the next assistant turn: the conversation, then the generation prompt."""
    return [i for ids, _ in render(tokenizer, messages) for i in ids]


@dataclass
class Turn:
    """One message as token ids: its marker, its content, and (assistant turns) the closing </s>."""

    role: str
    ids: np.ndarray  # int64
    target: np.ndarray  # bool, same length: which ids are learned


class ChatFormat:
    """Renders conversations in the instruct format with a tokenizer that has the turn markers among
    its special tokens, turn by turn with the loss mask of fine-tuning."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.marker_ids = {}
        for role, marker in ROLE_MARKERS.items():
            token_id = tokenizer.convert_tokens_to_ids(marker)
            if token_id in (None, tokenizer.unk_token_id):
                raise ValueError(
                    f"the tokenizer has no {marker} token: chat needs a tokenizer made by "
                    "`teleflm tokenizer train` (its special tokens include the turn markers)"
                )
            self.marker_ids[role] = token_id
        self.role_of = {token_id: role for role, token_id in self.marker_ids.items()}

    def turns(self, messages: list[dict]) -> list[Turn]:
        """The turns of a conversation of validated messages (teleflm.sft.data checks them): each
        opens at its marker, which only the template's own text can hold."""
        turns: list[tuple[str, list[int], list[bool]]] = []
        for ids, index in render(
            self.tokenizer, messages, add_generation_prompt=False, template=CHAT_TEMPLATE
        ):
            for token_id in ids:
                if index is None and token_id in self.role_of:
                    turns.append((self.role_of[token_id], [token_id], [False]))
                else:  # content, or the </s> closing an assistant turn
                    role, turn_ids, target = turns[-1]
                    turn_ids.append(token_id)
                    target.append(role == "assistant")
        return [Turn(role, np.array(ids, dtype=np.int64), np.array(t, dtype=bool)) for role, ids, t in turns]

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss mask) of a whole conversation."""
        turns = self.turns(messages)
        return np.concatenate([t.ids for t in turns]), np.concatenate([t.target for t in turns])

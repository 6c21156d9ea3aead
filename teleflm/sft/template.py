"""The instruct chat format rendered to token ids with a loss mask, as the trainer sees it.

The text is what `tokenizer.apply_chat_template` gives with teleflm.data.tokenizer.CHAT_TEMPLATE:
`<_system>S<_user>U<_bot>A</s><_user>U2<_bot>A2</s>`. Each turn is encoded on its own and the
markers are inserted as ids; since a special token always splits the text it sits in, this equals
encoding the whole rendered text (tests check it against `apply_chat_template` in plain
transformers). The loss mask marks the tokens the model learns to produce: each assistant turn's
content and the `</s>` that ends it, never the markers, the system prompt or the user's words.
"""

from dataclasses import dataclass

import numpy as np

from teleflm.data.tokenizer import SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
ROLE_MARKERS = {"system": "<_system>", "user": "<_user>", "assistant": "<_bot>"}


@dataclass
class Turn:
    """One message as token ids: its marker, its content, and (assistant turns) the closing </s>."""

    role: str
    ids: np.ndarray  # int64
    target: np.ndarray  # bool, same length: which ids are learned


class ChatFormat:
    """Renders conversations with a tokenizer that has the turn markers among its special tokens."""

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
        self.eos_id = tokenizer.eos_token_id

    def turns(self, messages: list[dict]) -> list[Turn]:
        """The turns of a conversation of validated messages (teleflm.sft.data checks them)."""
        contents = self.tokenizer([m["content"] for m in messages], add_special_tokens=False)["input_ids"]
        turns = []
        for message, content in zip(messages, contents, strict=True):
            role = message["role"]
            ids = [self.marker_ids[role], *content]
            target = [False] + [role == "assistant"] * len(content)
            if role == "assistant":
                ids.append(self.eos_id)
                target.append(True)
            turns.append(Turn(role, np.array(ids, dtype=np.int64), np.array(target, dtype=bool)))
        return turns

    def render(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, loss mask) of a whole conversation."""
        turns = self.turns(messages)
        return np.concatenate([t.ids for t in turns]), np.concatenate([t.target for t in turns])

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The ids that ask for the next assistant turn: the conversation so far, then `<_bot>`."""
        ids, _ = self.render(messages) if messages else (np.empty(0, np.int64), None)
        return [*ids.tolist(), self.marker_ids["assistant"]]


def special_token_in(text: str) -> str | None:
    """The first special token written inside `text`, if any: such text would tokenize to a marker
    and could forge a turn, so message contents may not hold one."""
    return next((token for token in SPECIAL_TOKENS if token in text), None)

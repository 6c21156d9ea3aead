"""Chat messages to prompt text: the tokenizer's own chat template when it has one, else the
instruct model's turn markers.

The fallback renders `<_system>S<_user>U<_bot>A</s><_user>U2<_bot>`: each turn is its marker followed by
its text, an assistant turn ends with the EOS token (which is where generation stops), and the prompt
ends with `<_bot>` so that the model answers next.
"""

MARKERS = {"system": "<_system>", "user": "<_user>", "assistant": "<_bot>"}


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """Prompt text for `messages` ({"role": "system"|"user"|"assistant", "content": str}), ending where
    the assistant's answer begins. Encode it with `add_special_tokens=False`: the text already holds
    every special token it needs."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    turns = []
    for message in messages:
        if message["role"] not in MARKERS:
            raise ValueError(f"unknown role {message['role']!r} (use one of {', '.join(MARKERS)})")
        end = tokenizer.eos_token if message["role"] == "assistant" else ""
        turns.append(MARKERS[message["role"]] + message["content"] + end)
    return "".join(turns) + MARKERS["assistant"]

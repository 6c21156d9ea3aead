"""A chat session with an instruct model: history in the chat format, answers streamed as generated.

The prompt is the history rendered by the tokenizer's chat template plus the generation prompt
(`<_bot>`). Generation stops at `</s>` (the end of an assistant turn) or at a turn marker the model
might start on its own. When the history no longer leaves room for an answer within the model's
positions, its oldest exchanges are dropped (the system message stays), the rule fine-tuning uses.
"""

import torch

from teleflm.data.tokenizer import add_chat_template
from teleflm.sft.template import ROLE_MARKERS


class ChatSession:
    def __init__(
        self,
        model,
        tokenizer,
        system: str = "",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.03,
    ):
        from teleflm.model.io import real_vocab_size

        add_chat_template(tokenizer)
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template and no turn markers: it cannot chat")
        self.model, self.tokenizer = model, tokenizer
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []
        self.max_new_tokens = max_new_tokens
        stop = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(m) for m in ROLE_MARKERS.values()]
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        self.generation = {
            "max_new_tokens": max_new_tokens,
            "repetition_penalty": repetition_penalty,
            "eos_token_id": stop,
            "pad_token_id": tokenizer.pad_token_id,
            # Rows past the tokenizer are embedding padding: never emit them.
            "suppress_tokens": list(range(real_vocab_size(tokenizer), model.config.vocab_size)) or None,
            **(sampling if temperature > 0 else {"do_sample": False}),
        }

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def fitting_prompt(self, user_text: str) -> list[int]:
        """The prompt for the next answer, dropping the oldest exchanges until an answer fits."""
        room = self.model.config.max_position_embeddings - self.max_new_tokens
        while True:
            ids = self.prompt_ids(self.system + self.history + [{"role": "user", "content": user_text}])
            if len(ids) <= room or not self.history:
                break
            # An exchange is a user turn and the answer after it.
            self.history = self.history[2:]
        if len(ids) > room:
            raise ValueError(
                f"the message takes {len(ids)} tokens; with --max-new-tokens {self.max_new_tokens} the "
                f"model's {self.model.config.max_position_embeddings} positions leave room for {room}"
            )
        return ids

    def reply(self, user_text: str, streamer=None) -> str:
        """The model's answer to `user_text` (streamed to `streamer` as it comes); both join the history."""
        ids = self.fitting_prompt(user_text)
        inputs = torch.tensor([ids], device=self.model.device)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=streamer, **self.generation
            )
        answer = self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history = []

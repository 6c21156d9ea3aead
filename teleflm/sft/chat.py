"""A chat session with an instruct model: history in the chat format, answers streamed as generated.

The prompt is the history rendered by the tokenizer's chat template plus the generation prompt
(`<_bot>`), by teleflm.sft.template.render (contents stay text). Generation stops at `</s>` (the end
of an assistant turn) or at a turn marker the model might start on its own. When the history no
longer leaves room for a `max_new_tokens` answer within the model's positions, its oldest exchanges
are dropped (the system message stays), the rule fine-tuning uses; an answer never runs past the
model's positions (it is cut shorter when the message alone leaves less room).
"""

import torch

from teleflm.data.tokenizer import add_chat_template, padded_ids
from teleflm.model.io import new_token_budget
from teleflm.sft.template import ROLE_MARKERS, prompt_ids


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
            "repetition_penalty": repetition_penalty,
            "eos_token_id": stop,
            "pad_token_id": tokenizer.pad_token_id,
            # Rows past the tokenizer are embedding padding: never emit them.
            "suppress_tokens": padded_ids(tokenizer, model.config.vocab_size) or None,
            **(sampling if temperature > 0 else {"do_sample": False}),
        }

    def fitting_prompt(self, user_text: str) -> tuple[list[int], int]:
        """(prompt for the next answer, tokens the answer may take), dropping the oldest exchanges
        until a `max_new_tokens` answer fits."""
        context = self.model.config.max_position_embeddings
        while True:
            messages = self.system + self.history + [{"role": "user", "content": user_text}]
            ids = prompt_ids(self.tokenizer, messages)
            if len(ids) + self.max_new_tokens <= context or not self.history:
                break
            # An exchange is a user turn and the answer after it.
            self.history = self.history[2:]
        return ids, new_token_budget(len(ids), self.max_new_tokens, context)

    def reply(self, user_text: str, streamer=None) -> str:
        """The model's answer to `user_text` (streamed to `streamer` as it comes); both join the history."""
        ids, budget = self.fitting_prompt(user_text)
        inputs = torch.tensor([ids], device=self.model.device)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                streamer=streamer,
                max_new_tokens=budget,
                **self.generation,
            )
        answer = self.tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    def reset(self) -> None:
        self.history = []

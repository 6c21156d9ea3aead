"""Greedy continuations from an export, each decoded twice (with and without the KV cache): a
cache that transformers fails to hand the model reads as garbage only after the first token, so the
two decodings differ."""

from pathlib import Path

import torch

from teleflm.data.tokenizer import padded_ids
from teleflm.model.io import load_pretrained


def greedy_samples(
    export: str | Path, prompts: dict[str, str], max_new_tokens: int = 40
) -> tuple[dict[str, str], list[str]]:
    """Name -> prompt and its greedy continuation, and the names whose cached decoding gave other
    tokens than the uncached one."""
    model, tokenizer = load_pretrained(export, dtype="fp32", device="cpu")
    padded = padded_ids(tokenizer, model.config.vocab_size)
    settings = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        repetition_penalty=1.03,
        suppress_tokens=padded or None,
    )
    samples, mismatch = {}, []
    for name, prompt in prompts.items():
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, **settings)
            uncached = model.generate(**inputs, **settings, use_cache=False)
        if not torch.equal(ids, uncached):
            mismatch.append(name)
        samples[name] = prompt + tokenizer.decode(
            ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return samples, mismatch

"""A synthetic instruction task, a tokenizer and a tiny pre-trained base model for the SFT tests."""

import json
import random
from pathlib import Path

import numpy as np
import torch

from teleflm.testing import tiny_train_config
from teleflm.train.config import TrainConfig
from teleflm.train.trainer import Trainer

COLORS = ["red", "green", "blue", "black", "white", "brown", "grey", "pink"]
ANIMALS = ["cat", "dog", "horse", "mouse", "bird", "fish", "sheep", "goat"]
WORDS = COLORS + ANIMALS
SYSTEM = "Describe it."
CONTEXT = 64


def task(color: str, animal: str) -> tuple[str, str]:
    """(user message, the expected answer): both words, swapped into a fixed answer format."""
    return f"{color} {animal}", f"A {animal} that is {color}."


def word_pairs(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs): every word is trained on, the held-out pairs never are."""
    pairs = [(c, a) for c in COLORS for a in ANIMALS]
    random.Random(seed).shuffle(pairs)
    return pairs[16:], pairs[:16]


def conversation(color: str, animal: str) -> dict:
    user, answer = task(color, animal)
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def write_chat_set(path: Path, pairs) -> Path:
    path.write_text("".join(json.dumps(conversation(c, a)) + "\n" for c, a in pairs))
    return path


def plain_text(n: int = 400, seed: int = 1) -> list[str]:
    """Base-model text: sentences over the same words, never in the chat format."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(n)]


def train_chat_tokenizer(out: Path) -> Path:
    from teleflm.data.tokenizer import train_tokenizer

    texts = plain_text() + [SYSTEM] + [" ".join(task(a, b)) for a, b in word_pairs()[0]]
    return train_tokenizer(iter(texts * 3), 320, out)


def base_config(out: Path, **sections) -> TrainConfig:
    """The tiny training config over the task's 320-token vocabulary: 15 steps of 16 x 64 tokens."""
    ours = {
        "model": {"vocab_size": 320, "max_position_embeddings": CONTEXT},
        "data": {"context_length": CONTEXT},
        "batch": {"global_batch_tokens": CONTEXT * 16, "micro_batch_size": 16},
        "schedule": {"total_tokens": CONTEXT * 16 * 15, "warmup_steps": 3},
        "checkpoint": {"interval_steps": 1000, "export_at_end": True},
    }
    for name, values in sections.items():
        ours[name] = {**ours.get(name, {}), **values}
    return tiny_train_config(out, **ours)


def pretrain_base(out: Path, tokenizer_dir: Path) -> Path:
    """A base model pre-trained briefly on plain text over the task's words; returns its export."""
    from teleflm.data.synthetic import ArrayStream
    from teleflm.data.tokenizer import EOS_ID, load_tokenizer
    from teleflm.train.trainer import Trainer

    tokenizer = load_tokenizer(tokenizer_dir)
    ids = []
    for text in plain_text():
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS_ID]
    rows = len(ids) // (CONTEXT + 1)
    sequences = np.array(ids[: rows * (CONTEXT + 1)], dtype=np.int64).reshape(rows, CONTEXT + 1)
    cfg = base_config(out, data={"tokenizer": str(tokenizer_dir)})
    Trainer(cfg, stream_factory=lambda rank, size: ArrayStream(sequences, rank, size)).run()
    return out / "export"


def sft_toml(path: Path, init: Path, data: Path, out: Path, extra: str = "") -> Path:
    path.write_text(
        f"""out = "{out}"
seed = 0

[sft]
init = "{init}"
data = ["{data}"]
epochs = 300.0
{extra}

[mup]
lr = 1e-2
matrix_lr = 1e-2
min_lr = 1e-3

[data]
context_length = {CONTEXT}

[batch]
global_batch_tokens = {CONTEXT * 8}
micro_batch_size = 8

[schedule]
warmup_steps = 5

[parallel]
mixed_precision = "fp32"

[checkpoint]
interval_steps = 1000

[logging]
progress_bar = false
"""
    )
    return path


def answer_accuracy(model_dir: Path, pairs) -> float:
    """Share of prompts whose greedy answer is exactly the expected one (stopping at </s>)."""
    import torch

    from teleflm.model.io import load_pretrained

    model, tokenizer = load_pretrained(model_dir, device="cpu")
    correct = 0
    for a, b in pairs:
        user, expected = task(a, b)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
        answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += answer == expected
    return correct / len(pairs)


ROWS = 16  # base_config's 16 sequences per step, in one micro-batch


def packed_batch(seed: int = 0) -> dict:
    """Each row: conversation 0 (prompt, then a learned answer), conversation 1 (a prompt with no
    learned token, as when an answer was cut), then padding (its own document)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 320, size=(ROWS, CONTEXT + 1))
    loss_mask = np.zeros_like(tokens, dtype=bool)
    doc_ids = np.zeros_like(tokens, dtype=np.int32)
    loss_mask[:, 10:30] = True  # conversation 0: tokens 0..29, its answer 10..29
    doc_ids[:, 30:50] = 1  # conversation 1: tokens 30..49, nothing learned
    doc_ids[:, 50:] = 2
    tokens[:, 50:] = 3  # padding
    return {"tokens": tokens, "domain": np.zeros(ROWS, np.int64), "loss_mask": loss_mask, "doc_ids": doc_ids}


def tiny_trainer(out) -> Trainer:
    # The batches are given to forward_backward directly; the stream is never read.
    return Trainer(base_config(out), stream_factory=lambda rank, size: None)


def step(trainer: Trainer, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.global_mean_loss(trainer.forward_backward(batch))
    return loss, {name: p.grad.clone() for name, p in trainer.module.named_parameters()}

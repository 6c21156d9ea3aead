"""Loss masking: only assistant tokens give gradients, in the trainer's own step."""

import numpy as np
import torch

from teleflm.model.loss import token_loss_sum
from teleflm.train.trainer import Trainer
from tests.sft.common import CONTEXT, base_config

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


def test_only_assistant_tokens_give_gradients(tmp_path):
    trainer = tiny_trainer(tmp_path / "run")
    batch = packed_batch()
    loss, grads = step(trainer, batch)

    # The loss is the mean NLL over the learned targets, computed here from the logits directly.
    tokens = torch.from_numpy(batch["tokens"])
    with torch.no_grad():
        logits = trainer.module(input_ids=tokens[:, :-1], use_cache=False).logits
    manual = torch.nn.functional.cross_entropy(logits[:, 9:29].flatten(0, 1), tokens[:, 10:30].flatten())
    assert abs(loss - manual.item()) < 1e-5 * manual.item()

    # Every token that is not learned (conversation 1, padding) changed: loss and gradients identical.
    other = {**batch, "tokens": batch["tokens"].copy()}
    other["tokens"][:, 30:] = np.random.default_rng(1).integers(4, 320, size=(ROWS, CONTEXT + 1 - 30))
    other_loss, other_grads = step(trainer, other)
    assert other_loss == loss
    assert all(torch.equal(grads[name], other_grads[name]) for name in grads)

    # One learned token changed: loss and gradients change.
    learned = {**batch, "tokens": batch["tokens"].copy()}
    learned["tokens"][0, 20] = 4 + (learned["tokens"][0, 20] - 3) % 316
    learned_loss, learned_grads = step(trainer, learned)
    assert learned_loss != loss
    assert not torch.equal(grads["lm_head.weight"], learned_grads["lm_head.weight"])


def test_masked_targets_give_zero_gradient_at_their_logits(tmp_path):
    """At the logits: d loss / d logits is exactly zero at every position whose target is masked."""
    trainer = tiny_trainer(tmp_path / "run")
    batch = packed_batch()
    tokens = torch.from_numpy(batch["tokens"])
    learned = torch.from_numpy(batch["loss_mask"])[:, 1:]
    targets = trainer.mask_targets(tokens[:, 1:], learned)
    logits = trainer.module(input_ids=tokens[:, :-1], use_cache=False).logits
    logits.retain_grad()
    token_loss_sum(logits, targets, trainer.real_vocab_size).backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[~learned] == 0).all()
    assert (per_position[learned] > 0).all()
    assert trainer.step_targets == int(learned.sum())

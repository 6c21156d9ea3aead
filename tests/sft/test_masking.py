"""Loss masking: only assistant tokens give gradients, in the trainer's own step."""

import numpy as np
import torch

from teleflm.model.loss import token_loss_sum
from tests.sft.common import CONTEXT, ROWS, packed_batch, step, tiny_trainer


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
    targets = trainer.learned_targets(tokens[:, 1:], learned)
    logits = trainer.module(input_ids=tokens[:, :-1], use_cache=False).logits
    logits.retain_grad()
    token_loss_sum(logits, targets, trainer.real_vocab_size).backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[~learned] == 0).all()
    assert (per_position[learned] > 0).all()
    assert trainer.step_targets == int(learned.sum())

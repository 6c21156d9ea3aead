"""Helpers of the loss tests (tests/train/test_loss.py, test_document_attention.py): a tiny training
model with large weights, a batch over a real vocabulary below the padded one, a loss with its
gradients, and their comparison."""

import pytest
import torch

from teleflm.model.loss import IGNORE_INDEX
from teleflm.testing import tiny_config
from teleflm.train.model import TeleFLMForTraining
from tests.model.reference import MUP

VOCAB = 128


TOKENS = 40


REAL_VOCABS = (100, 60)


def training_model(seed: int = 0) -> TeleFLMForTraining:
    torch.manual_seed(seed)
    model = TeleFLMForTraining(tiny_config(vocab_size=VOCAB, **MUP))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def batch(real_vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, real_vocab, (3, TOKENS), generator=g)
    targets = torch.randint(0, real_vocab, (3, TOKENS), generator=g)
    targets[0, :9] = IGNORE_INDEX  # a prompt: not learned
    targets[2, 30:] = IGNORE_INDEX
    return inputs, targets


def loss_and_grads(model, fn, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """fn(*args)'s loss and the gradients it gives `model`'s parameters (full tensors under tp)."""
    model.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g.clone()
    return loss.detach(), grads


def assert_close(loss, grads, ref_loss, ref_grads, rel=1e-5):
    assert float(loss) == pytest.approx(float(ref_loss), rel=rel)
    for name, ref in ref_grads.items():
        err = (torch.as_tensor(grads[name]) - ref).abs().max().item()
        assert err <= rel * ref.abs().max().item(), (name, err)

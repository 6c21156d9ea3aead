"""The chunked readout loss equals the loss of the full logits (fp32, 1e-5), loss and every gradient,
with a padded vocabulary, muP's logit scale and unlearned targets; in one process, and
vocabulary-parallel under tensor parallel 2 on gloo against the unsharded model."""

import pytest
import torch

from teleflm.model import loss as chunked
from teleflm.model.loss import token_loss_sum
from teleflm.testing import run_ranks
from tests.train.common import REAL_VOCABS, VOCAB, assert_close, batch, loss_and_grads, training_model

# Vocabulary-parallel over 2 ranks of 64 ids: both slices hold real ids, or the second none.


def full_logits_reference(model, inputs, targets, real_vocab):
    logits = model(input_ids=inputs, use_cache=False).logits
    return token_loss_sum(logits, targets, real_vocab)


@pytest.mark.parametrize("real_vocab", REAL_VOCABS)
def test_chunked_loss_equals_full_logits_loss(real_vocab, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_LOGITS", VOCAB * 7)  # chunks of 7 tokens, the last shorter
    model = training_model()
    assert model.config.logit_scale == 0.5
    inputs, targets = batch(real_vocab)
    ref_loss, ref_grads = loss_and_grads(model, full_logits_reference, model, inputs, targets, real_vocab)
    loss, grads = loss_and_grads(model, model.loss_sum, inputs, targets, real_vocab)
    assert_close(loss, grads, ref_loss, ref_grads)
    assert (grads["lm_head.weight"][real_vocab:] == 0).all()  # padded ids get no mass, no gradient
    with torch.no_grad():
        assert model.loss_sum(inputs, targets, real_vocab).item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_the_comparison_sees_a_wrong_scale():
    """The reference check fails when the chunked loss drops muP's logit scale."""
    model = training_model()
    inputs, targets = batch(100)
    ref = full_logits_reference(model, inputs, targets, 100)
    h = model.model(input_ids=inputs, use_cache=False).last_hidden_state
    unscaled = chunked.readout_loss_sum(h, model.lm_head.weight, targets, 1.0, 100)
    assert abs(unscaled.item() - ref.item()) > 1e-3 * ref.item()


def _tp_loss_and_grads():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from teleflm.parallel.parallelize import apply_tp

    chunked.CHUNK_LOGITS = 64 * 5  # several chunks per rank
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    model = training_model()
    apply_tp(model, mesh)
    results = {}
    for real_vocab in REAL_VOCABS:
        inputs, targets = batch(real_vocab)
        loss, grads = loss_and_grads(model, model.loss_sum, inputs, targets, real_vocab)
        # numpy across the process boundary (tensors would travel as shared memory of an ended process)
        results[real_vocab] = (loss.numpy(), {name: g.numpy() for name, g in grads.items()})
    return results


@pytest.mark.slow
def test_vocabulary_parallel_loss_under_tp2_equals_unsharded():
    ranks = run_ranks(2, _tp_loss_and_grads)
    model = training_model()
    for real_vocab in REAL_VOCABS:
        inputs, targets = batch(real_vocab)
        ref_loss, ref_grads = loss_and_grads(model, full_logits_reference, model, inputs, targets, real_vocab)
        for rank in ranks:
            assert_close(*rank[real_vocab], ref_loss, ref_grads)

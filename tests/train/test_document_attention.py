"""Attention within packed documents without a dense mask gives the dense mask's losses and gradients:
the CPU path (each document's slice through SDPA) in the model, in a compiled trainer step and in
held-out evaluation; FlexAttention's forward on CPU (its backward only where it has one)."""

import numpy as np
import pytest
import torch

from teleflm.eval.bpb import bits_per_byte, logits_loss
from teleflm.model.loss import token_loss_sum
from teleflm.train.attention import (
    FlexDocumentAttention,
    SlicedDocumentAttention,
    causal_document_mask,
    document_attention,
    document_spans,
)
from tests.sft.common import base_config
from tests.train.common import REAL_VOCABS, TOKENS, assert_close, batch, loss_and_grads, training_model

REAL = REAL_VOCABS[0]


def many_documents(rows: int = 3, width: int = TOKENS, seed: int = 0) -> torch.Tensor:
    """Document ids of rows packed with short documents (lengths 1 to 9, some repeated across rows),
    and one row holding a single document."""
    g = np.random.default_rng(seed)
    ids = np.zeros((rows, width), dtype=np.int64)
    for r in range(rows - 1):
        ends = np.cumsum(g.integers(1, 10, size=width))
        ids[r] = np.searchsorted(ends, np.arange(width), side="right")
    return torch.from_numpy(ids)


def test_document_spans():
    doc_ids = torch.tensor([[0, 0, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5]])
    assert document_spans(doc_ids) == [[(0, 2), (2, 3), (3, 6)], [(0, 6)]]
    assert isinstance(document_attention(doc_ids), SlicedDocumentAttention)  # on CPU


def dense_reference(model, inputs, targets, doc_ids):
    logits = model(input_ids=inputs, attention_mask=causal_document_mask(doc_ids), use_cache=False).logits
    return token_loss_sum(logits, targets, REAL)


def test_sliced_documents_equal_the_dense_mask():
    model = training_model()
    inputs, targets = batch(REAL)
    doc_ids = many_documents()
    assert max(len(spans) for spans in document_spans(doc_ids)) >= 6
    ref_loss, ref_grads = loss_and_grads(model, dense_reference, model, inputs, targets, doc_ids)
    loss, grads = loss_and_grads(model, model.loss_sum, inputs, targets, REAL, doc_ids)
    assert_close(loss, grads, ref_loss, ref_grads)
    # The documents matter: without them the loss differs.
    assert abs(model.loss_sum(inputs, targets, REAL).item() - ref_loss) > 1e-3 * ref_loss


def test_flex_attention_equals_the_dense_mask():
    """Forward on CPU (compiled FlexAttention); gradients too on an accelerator, where its backward exists."""
    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    model = training_model().to(device)
    inputs, targets = (t.to(device) for t in batch(REAL))
    doc_ids = many_documents().to(device)
    flex = FlexDocumentAttention(doc_ids)
    with torch.no_grad():
        ref = dense_reference(model, inputs, targets, doc_ids).item()
        logits = model(input_ids=inputs, attention_mask=flex, use_cache=False).logits
    assert token_loss_sum(logits, targets, REAL).item() == pytest.approx(ref, rel=1e-5)
    if device.type == "cpu":
        return
    ref_loss, ref_grads = loss_and_grads(model, dense_reference, model, inputs, targets, doc_ids)
    loss, grads = loss_and_grads(model, model.loss_sum, inputs, targets, REAL, doc_ids)
    assert_close(loss, grads, ref_loss, ref_grads, rel=1e-4)


@pytest.mark.slow
def test_compiled_trainer_step_with_documents_equals_eager(tmp_path):
    """A compiled layer breaks its graph at the sliced attention; the step's loss and gradients are
    those of the eager step."""
    from teleflm.train.trainer import Trainer
    from tests.sft.common import packed_batch, step

    results = []
    for compile in (False, True):
        cfg = base_config(
            tmp_path / str(compile), data={"document_mask": True}, parallel={"compile": compile}
        )
        trainer = Trainer(cfg, stream_factory=lambda rank, size: None)
        results.append(step(trainer, packed_batch()))
    (eager_loss, eager), (compiled_loss, compiled) = results
    assert_close(compiled_loss, compiled, eager_loss, eager, rel=1e-4)


def test_evaluation_within_documents_equals_the_dense_mask():
    model = training_model().eval()
    g = np.random.default_rng(0)
    docs = [(g.integers(4, REAL, size=g.integers(1, 12)), 10) for _ in range(30)]

    def dense(inputs, targets, doc_ids):
        mask = causal_document_mask(doc_ids)
        return token_loss_sum(
            model(input_ids=inputs, attention_mask=mask, use_cache=False).logits, targets, REAL
        )

    def sliced(inputs, targets, doc_ids):
        return model.loss_sum(inputs, targets, REAL, doc_ids)

    ref = bits_per_byte(dense, docs, 16, document_mask=True, batch_size=3)
    ours = bits_per_byte(sliced, docs, 16, document_mask=True, batch_size=3)
    assert ours["tokens"] == ref["tokens"] and ours["bpb"] == pytest.approx(ref["bpb"], rel=1e-5)
    across = bits_per_byte(logits_loss(lambda x: model(input_ids=x, use_cache=False).logits, REAL), docs, 16)
    assert abs(across["bpb"] - ref["bpb"]) > 1e-4 * ref["bpb"]  # attending across documents differs

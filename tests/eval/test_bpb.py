"""Bits per byte: every document token predicted once, separators never, padded ids get no mass."""

import math

import numpy as np
import pytest
import torch

from teleflm.eval.bpb import EOS, bits_per_byte, compressor_bpb, eval_windows, held_out_bytes, logits_loss
from teleflm.testing import run_ranks


def documents(n: int = 7, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(4, 50, size=rng.integers(1, 40)), int(rng.integers(10, 200))) for _ in range(n)]


def test_windows_predict_each_document_token_once():
    docs = documents()
    windows, mask, n_bytes, n_docs = eval_windows(docs, context_length=16, max_windows=100)
    targets = windows[:, 1:][mask]
    assert targets.tolist() == [int(t) for doc, _ in docs for t in doc]
    assert EOS not in targets
    assert n_bytes == sum(b for _, b in docs) and n_docs == len(docs)


@pytest.mark.parametrize("stride", [16, 9, 4, 1])
def test_overlapping_windows_score_each_target_once_after_the_stated_context(stride):
    docs = documents()
    windows, mask, n_bytes, n_docs = eval_windows(docs, context_length=16, max_windows=100, stride=stride)
    targets = windows[:, 1:][mask]
    assert targets.tolist() == [int(t) for doc, _ in docs for t in doc]  # each once, in order
    stream = np.concatenate([np.r_[EOS, doc] for doc, _ in docs])
    for i, window in enumerate(windows):
        piece = stream[i * stride : i * stride + 17]
        assert window[: len(piece)].tolist() == piece.tolist()
        if i:  # after the first window, only predictions with at least 16 - stride tokens before them
            assert not mask[i, : 16 - stride].any()
    assert n_bytes == sum(b for _, b in docs) and n_docs == len(docs)


def test_stride_leaves_a_context_free_model_unchanged_and_must_fit_the_context():
    table = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    scores = [
        bits_per_byte(logits_loss(lambda x: table[x], 60), documents(), 8, stride=s, batch_size=3)
        for s in (0, 3)
    ]
    assert scores[0]["tokens"] == scores[1]["tokens"]
    assert scores[1]["bpb"] == pytest.approx(scores[0]["bpb"], rel=1e-6)
    with pytest.raises(ValueError, match="eval stride 9 must be between 1 and the context length 8"):
        eval_windows(documents(), context_length=8, max_windows=4, stride=9)


def test_window_budget_takes_whole_documents():
    docs = documents(50)
    windows, mask, n_bytes, n_docs = eval_windows(docs, context_length=16, max_windows=3)
    taken = mask.sum()
    assert len(windows) <= 3 and 0 < taken <= 3 * 16
    # The bytes counted are those of exactly the documents whose tokens are targets.
    k = next(i for i in range(len(docs) + 1) if sum(len(d) for d, _ in docs[:i]) == taken)
    assert n_bytes == sum(b for _, b in docs[:k]) and n_docs == k


def uniform_logits(padded_vocab: int, real_vocab: int):
    return logits_loss(lambda x: torch.zeros(*x.shape, padded_vocab), real_vocab)


def test_uniform_model_gives_log_vocab_and_masks_padding():
    docs = documents()
    real, padded = 50, 64
    r = bits_per_byte(uniform_logits(padded, real), docs, context_length=16)
    tokens = sum(len(d) for d, _ in docs)
    assert r["tokens"] == tokens
    assert r["nll_per_token"] == pytest.approx(math.log(real))  # not log(64): padded ids excluded
    assert r["bpb"] == pytest.approx(tokens * math.log(real) / (math.log(2) * r["bytes"]))


def _bpb_on_rank():
    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    table = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    return bits_per_byte(
        logits_loss(lambda x: table[x], 60),
        documents(),
        8,
        batch_size=2,
        dp_rank=rank,
        dp_size=size,
        groups=(None,),
    )


def test_data_parallel_split_sums_to_single_process():
    table = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    single = bits_per_byte(logits_loss(lambda x: table[x], 60), documents(), 8, batch_size=2)
    ranks = run_ranks(2, _bpb_on_rank)
    for r in ranks:
        assert r["tokens"] == single["tokens"]
        assert r["bpb"] == pytest.approx(single["bpb"], rel=1e-6)  # fp32 sums in another order


def test_no_documents_give_no_windows_and_no_bpb():
    """An empty held-out split: nothing scored (it crashed evaluation after the last checkpoint)."""
    windows, mask, n_bytes, n_docs = eval_windows([], context_length=16, max_windows=4)
    assert windows.shape == (0, 17) and mask.shape == (0, 16) and n_bytes == n_docs == 0
    r = bits_per_byte(uniform_logits(64, 50), [], context_length=16)
    assert r["documents"] == r["tokens"] == r["bytes"] == 0 and math.isnan(r["bpb"])


class ByteTokens:
    """A tokenizer whose ids are UTF-8 bytes."""

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode()


def test_held_out_bytes_are_the_documents_the_evaluation_reads():
    texts = ["first document", "second, longer document", "third"]
    docs = [(np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64), len(t.encode())) for t in texts]
    # 2 windows of 20 tokens hold the first two documents with their separators, not the third
    assert held_out_bytes(docs, ByteTokens(), 20, 2) == (texts[0] + texts[1]).encode()
    wrong = [(docs[0][0], docs[0][1] + 1), *docs[1:]]
    with pytest.raises(RuntimeError, match="decodes to 14 bytes, the shards record 15"):
        held_out_bytes(wrong, ByteTokens(), 20, 1)


def test_compressors_find_repetition_and_not_noise():
    repeated = b"In the beginning God created the heaven and the earth. " * 200
    noise = np.random.default_rng(0).integers(0, 256, len(repeated), dtype=np.uint8).tobytes()
    assert all(bpb < 0.5 for bpb in compressor_bpb(repeated).values())
    assert all(bpb > 7.9 for bpb in compressor_bpb(noise).values())

"""Bits per byte on held-out documents: `sum NLL (nats) / (ln 2 * UTF-8 bytes)` (docs/training.md).

Documents are laid end to end, each preceded by `</s>`, and cut into windows of `context_length`
predictions, end to end or overlapping by a stride (each token then scored once, with more context);
every document token is predicted (the `</s>` separators are inputs, never targets), and
padded vocabulary ids get no probability mass. With `document_mask` a token attends only to its own
document, as in training with `data.document_mask`. Work is split over data-parallel ranks and summed;
under pipeline parallel only the last stage has a loss, and the sums reach every stage.
"""

import gzip
import lzma
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from teleflm.data.mixture import document_ids
from teleflm.model.loss import IGNORE_INDEX, token_loss_sum

EOS = 2
# loss_fn(inputs [n, T], targets [n, T] (IGNORE_INDEX where none), doc_ids [n, T] or None) -> summed
# NLL, or None on a pipeline stage that has no loss.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]


def logits_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], real_vocab_size: int) -> LossFn:
    """The loss of a model given as `logits_fn(inputs) -> logits` (it attends across documents)."""
    return lambda inputs, targets, doc_ids: token_loss_sum(logits_fn(inputs), targets, real_vocab_size)


def eval_windows(
    documents: Iterable[tuple[np.ndarray, int]], context_length: int, max_windows: int, stride: int = 0
):
    """(inputs+targets windows [n, T+1], target mask [n, T], utf-8 bytes of the documents covered,
    number of documents covered): the first documents of the split, in order.

    Documents are taken whole until they fill `max_windows` windows of T predictions; the last partial
    window is kept. `stride` (0: T) is how far each window starts after the one before: below T the
    windows overlap and each after the first scores only its last `stride` predictions, so every
    target is still scored once, now after at least T - stride tokens of context where the stream has
    them (a sliding-window evaluation; at T, a window's first token has none). No documents (an
    empty held-out split): no windows."""
    stride = stride or context_length
    if not 0 < stride <= context_length:
        raise ValueError(f"eval stride {stride} must be between 1 and the context length {context_length}")
    tokens, mask, n_bytes, n_docs = [], [], 0, 0
    budget = max_windows * context_length + 1
    for doc, doc_bytes in documents:
        if len(tokens) + len(doc) + 1 > budget and tokens:
            break
        tokens.append(EOS)
        mask.append(False)
        tokens.extend(int(t) for t in doc)
        mask.extend([True] * len(doc))
        n_bytes += int(doc_bytes)
        n_docs += 1
    stream = np.asarray(tokens, dtype=np.int64)
    targets = np.asarray(mask[1:], dtype=bool)
    predictions = len(targets)
    n = 1 + max(0, math.ceil((predictions - context_length) / stride)) if predictions else 0
    windows = np.full((n, context_length + 1), EOS, dtype=np.int64)
    window_mask = np.zeros((n, context_length), dtype=bool)
    for i in range(n):
        start = i * stride
        piece = stream[start : start + context_length + 1]
        windows[i, : len(piece)] = piece
        first = 0 if i == 0 else context_length - stride  # the targets before it were scored already
        end = len(piece) - 1
        window_mask[i, first:end] = targets[start + first : start + end]
    return windows, window_mask, n_bytes, n_docs


@torch.no_grad()
def bits_per_byte(
    loss_fn: LossFn,
    documents: Iterable[tuple[np.ndarray, int]],
    context_length: int,
    max_windows: int = 64,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    dp_rank: int = 0,
    dp_size: int = 1,
    groups: tuple = (),
    document_mask: bool = False,
    stride: int = 0,
) -> dict:
    """Held-out bits per byte of one domain. `loss_fn` (LossFn) gives the summed NLL of a batch; its
    doc_ids are each input token's document within its row with `document_mask`, else None. With
    dp_size > 1 every rank of the group must call this with the same documents; each evaluates its
    share, and the sums are all-reduced over each of `groups` in turn (data-parallel, then pipeline).
    `stride` below `context_length` overlaps the windows (eval_windows): the same targets, each with
    more context, for context_length / stride times the work."""
    windows, mask, n_bytes, n_docs = eval_windows(documents, context_length, max_windows, stride)
    mine = np.arange(dp_rank, len(windows), dp_size)
    # Same number of forward passes on every rank (FSDP gathers in lockstep): pad with empty batches.
    n_batches = math.ceil(math.ceil(len(windows) / dp_size) / batch_size)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        batch = torch.from_numpy(windows[idx] if len(idx) else windows[:1]).to(device)
        weight = torch.from_numpy(mask[idx] if len(idx) else np.zeros_like(mask[:1])).to(device)
        inputs = batch[:, :-1]
        doc_ids = torch.from_numpy(document_ids(inputs.cpu().numpy())).to(device) if document_mask else None
        loss = loss_fn(inputs, batch[:, 1:].masked_fill(~weight, IGNORE_INDEX), doc_ids)
        if loss is None:
            continue
        nll += loss.double()
        count += weight.sum().double()
    for group in groups:
        dist.all_reduce(nll, group=group)
        dist.all_reduce(count, group=group)
    nll_nats, tokens = nll.item(), int(count.item())
    return {
        "bpb": nll_nats / (math.log(2) * n_bytes) if n_bytes else math.nan,
        "nll_per_token": nll_nats / max(tokens, 1),
        "tokens": tokens,
        "bytes": n_bytes,
        "documents": n_docs,
    }


def held_out_bytes(
    documents: Iterable[tuple[np.ndarray, int]], tokenizer, context_length: int, max_windows: int
) -> bytes:
    """The UTF-8 text of the documents that `bits_per_byte` reads for these settings (decoded from
    their tokens), refused when it is not the byte count the shards record for them."""
    documents = list(documents)
    *_, n_bytes, n_docs = eval_windows(documents, context_length, max_windows)
    text = "".join(tokenizer.decode(doc.tolist()) for doc, _ in documents[:n_docs]).encode()
    if len(text) != n_bytes:
        raise RuntimeError(f"held-out text decodes to {len(text)} bytes, the shards record {n_bytes}")
    return text


def compressor_bpb(text: bytes) -> dict[str, float]:
    """Bits per byte that xz -9 (extreme) and gzip -9 reach on `text`: baselines beside a model's."""
    return {
        "xz -9": 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / len(text),
        "gzip -9": 8 * len(gzip.compress(text, compresslevel=9)) / len(text),
    }

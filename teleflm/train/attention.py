"""Attention within packed documents without a dense (batch, 1, T, T) mask.

The model takes, in place of an attention mask, a function `(q, k, v) -> output` (see
`TeleFLMAttention`); `document_attention(doc_ids)` returns the one for the device at hand:

- On CPU (torch 2.13: FlexAttention has no backward there, and SDPA on nested tensors refuses
  `is_causal`), each document's slice goes through SDPA with `is_causal=True`: no mask at all, and
  attention costs the sum of the documents' squared lengths instead of T^2.
- Elsewhere, FlexAttention with a block mask (causal and within a document): one entry per
  128 x 128 block, and fully masked blocks are skipped.

Both give the outputs and gradients of the dense mask, `causal_document_mask`, which stays as their
reference (tests/train/test_document_attention.py, bench/bench_attention.py).
"""

import functools

import torch
import torch.nn.functional as F


def document_attention(doc_ids: torch.Tensor):
    """The attention function for rows of packed documents; `doc_ids` (batch, T) gives each token's
    document (equal within a document, changing at each boundary)."""
    if doc_ids.device.type == "cpu":
        return SlicedDocumentAttention(doc_ids)
    return FlexDocumentAttention(doc_ids)


def causal_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, T, T) boolean mask: causal and within the same packed document."""
    same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    causal = torch.ones(doc_ids.shape[1], doc_ids.shape[1], dtype=torch.bool, device=doc_ids.device).tril()
    return same & causal


def document_spans(doc_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each document, in order."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    width = doc_ids.shape[1]
    spans: list[list[tuple[int, int]]] = [[] for _ in range(doc_ids.shape[0])]
    for row, start in torch.nonzero(starts).tolist():
        if spans[row]:
            spans[row][-1] = (spans[row][-1][0], start)
        spans[row].append((start, width))
    return spans


class SlicedDocumentAttention:
    """Each document's slice through SDPA with `is_causal=True`; documents of one length, across rows,
    go through one call (stacked), so unpacked rows cost a single call."""

    def __init__(self, doc_ids: torch.Tensor):
        self.spans = document_spans(doc_ids)
        self.by_length: dict[int, list[tuple[int, int]]] = {}
        for row, spans in enumerate(self.spans):
            for start, end in spans:
                self.by_length.setdefault(end - start, []).append((row, start))

    @torch.compiler.disable  # data-dependent slices: runs eagerly between the compiled graphs
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, width = q.shape[0], q.shape[2]
        gqa = q.shape[1] != k.shape[1]
        if len(self.by_length) == 1 and width in self.by_length:  # one document per row
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        pieces = {}
        for length, places in self.by_length.items():
            if len(places) == 1:  # a view, no copy
                ((row, s),) = places
                q_, k_, v_ = (x[row : row + 1, :, s : s + length] for x in (q, k, v))
            else:
                q_, k_, v_ = (
                    torch.stack([x[row, :, s : s + length] for row, s in places]) for x in (q, k, v)
                )
            out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=gqa)
            pieces.update(zip(places, out.unbind(0), strict=True))
        rows = [
            torch.cat([pieces[row, start] for start, _ in self.spans[row]], dim=1) for row in range(batch)
        ]
        return torch.stack(rows)


class FlexDocumentAttention:
    """FlexAttention under a block mask: causal, and a query sees only its own document's keys."""

    def __init__(self, doc_ids: torch.Tensor):
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document(b, h, q, kv):
            return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

        batch, width = doc_ids.shape
        self.block_mask = create_block_mask(same_document, batch, None, width, width, device=doc_ids.device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return compiled_flex_attention()(
            q, k, v, block_mask=self.block_mask, enable_gqa=q.shape[1] != k.shape[1]
        )


@functools.cache
def compiled_flex_attention():
    """FlexAttention runs its fused kernel only compiled."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)

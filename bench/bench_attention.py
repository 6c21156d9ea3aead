"""Attention within packed documents: the path the trainer takes on this device
(`teleflm.train.attention.document_attention`: per-document SDPA slices on CPU, FlexAttention block
masks elsewhere) against SDPA under the dense (batch, 1, T, T) mask, in one run: the memory each
mask holds, and the time of attention forward + backward (interleaved timings, median).

    .venv/bin/python -m bench.bench_attention [--lengths 2048,4096] [--docs 4,16] [--batch 2] [--repeats 3]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from teleflm.train.attention import (
    FlexDocumentAttention,
    SlicedDocumentAttention,
    causal_document_mask,
    document_attention,
)

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64


def packed_doc_ids(batch: int, width: int, docs: int, seed: int = 0) -> torch.Tensor:
    """Rows of `docs` documents each, cut at random places."""
    g = np.random.default_rng(seed)
    ids = np.zeros((batch, width), dtype=np.int64)
    for r in range(batch):
        cuts = np.sort(g.choice(np.arange(1, width), size=docs - 1, replace=False))
        ids[r] = np.searchsorted(cuts, np.arange(width), side="right")
    return torch.from_numpy(ids)


def held_bytes(attention) -> int:
    """What the attention function keeps to know the documents."""
    if isinstance(attention, torch.Tensor):
        return attention.numel() * attention.element_size()
    if isinstance(attention, SlicedDocumentAttention):
        return 16 * sum(len(spans) for spans in attention.spans)  # (start, end) per document
    if isinstance(attention, FlexDocumentAttention):
        parts = attention.block_mask.as_tuple()
        return sum(t.numel() * t.element_size() for t in parts if isinstance(t, torch.Tensor))
    raise TypeError(type(attention))


def timed_fwd_bwd(calls: dict, inputs: tuple, repeats: int, device) -> dict[str, float]:
    """Median milliseconds of each call's forward + backward, the calls interleaved."""
    grad = torch.randn_like(inputs[0])
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call(*inputs).backward(grad)
    for _ in range(repeats):  # interleaved: a noisy neighbour slows both alike
        for name, call in calls.items():
            for x in inputs:
                x.grad = None
            if device.type != "cpu":
                torch.accelerator.synchronize()
            started = time.perf_counter()
            call(*inputs).backward(grad)
            if device.type != "cpu":
                torch.accelerator.synchronize()
            times[name].append(time.perf_counter() - started)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def measure(width: int, docs: int, batch: int, repeats: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, HEADS, width, HEAD_DIM, generator=g).to(device).requires_grad_()
    k, v = (
        torch.randn(batch, KV_HEADS, width, HEAD_DIM, generator=g).to(device).requires_grad_()
        for _ in range(2)
    )
    doc_ids = packed_doc_ids(batch, width, docs).to(device)
    dense_mask = causal_document_mask(doc_ids)
    ours = document_attention(doc_ids)

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, enable_gqa=True)

    ms = timed_fwd_bwd({"dense": dense, "ours": ours}, (q, k, v), repeats, device)
    mem = {"dense": held_bytes(dense_mask), "ours": held_bytes(ours)}
    path = "sliced" if isinstance(ours, SlicedDocumentAttention) else "flex"
    return dict(
        T=width,
        docs=docs,
        path=path,
        mask_bytes=mem,
        mask_ratio=mem["ours"] / mem["dense"],
        ms=ms,
        speedup=ms["dense"] / ms["ours"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--docs", default="4,16", help="documents per row")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    print(
        f"attention fwd+bwd, batch {args.batch}, {HEADS} heads ({KV_HEADS} kv), head dim {HEAD_DIM}, fp32, {device}"
    )
    print(
        f"{'T':>5} {'docs':>4} {'path':7} {'dense mask KiB':>15} {'ours KiB':>9} {'ratio':>8} "
        f"{'dense ms':>9} {'ours ms':>8} {'speed-up':>8}"
    )
    rows = []
    for width in map(int, args.lengths.split(",")):
        for docs in map(int, args.docs.split(",")):
            r = measure(width, docs, args.batch, args.repeats, device)
            rows.append(r)
            print(
                f"{width:5} {docs:4} {r['path']:7} {r['mask_bytes']['dense'] / 1024:15.0f} "
                f"{r['mask_bytes']['ours'] / 1024:9.2f} {r['mask_ratio']:8.1e} "
                f"{r['ms']['dense']:9.0f} {r['ms']['ours']:8.0f} {r['speedup']:8.2f}",
                flush=True,
            )
    print("targets: mask <= 1% of dense; step >= 1.0x dense SDPA")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

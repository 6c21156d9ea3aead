"""Readout + cross-entropy, forward and backward, at Tele-FLM's vocabulary: the chunked loss
(`teleflm.model.loss.readout_loss_sum`) against the full logits (`lm_head`, muP scale, then
`token_loss_sum`, as the trainer did before), in one run: peak memory (each in a fresh process) and
tokens/s (interleaved timings, median).

    .venv/bin/python -m bench.bench_loss [--tokens 4096] [--width 512] [--vocab 80384] [--repeats 5]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.memory import peak_bytes
from teleflm.model.loss import readout_loss_sum, token_loss_sum

REAL_VOCAB = 80_000  # of the padded 80,384: the released tokenizer's entries
SCALE = 1 / 32  # the 52B model's logit scale


def setup(variant: str, tokens: int, width: int, vocab: int):
    """The inputs (a final-norm hidden state of one sequence, the readout weight, targets) and the
    fwd+bwd call of one variant."""
    device = torch.accelerator.current_accelerator() or torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, width, generator=g).to(device).requires_grad_()
    weight = torch.randn(vocab, width, generator=g).mul_(0.02).to(device).requires_grad_()
    real = min(REAL_VOCAB, vocab)
    targets = torch.randint(0, real, (1, tokens), generator=g).to(device)

    def full():
        token_loss_sum((h @ weight.T) * SCALE, targets, real).backward()

    def chunked():
        readout_loss_sum(h, weight, targets, SCALE, real).backward()

    def step():
        h.grad = weight.grad = None
        {"full": full, "chunked": chunked}[variant]()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=80_384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    shape = (args.tokens, args.width, args.vocab)
    variants = ("full", "chunked")
    memory = {v: peak_bytes(setup, v, *shape) for v in variants}
    steps = {v: setup(v, *shape) for v in variants}
    times = {v: [] for v in variants}
    for v in variants:
        steps[v]()  # warm-up
    for _ in range(args.repeats):  # interleaved: a noisy neighbour slows both alike
        for v in variants:
            started = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - started)
    rate = {v: args.tokens / statistics.median(times[v]) for v in variants}
    print(f"readout + loss fwd+bwd: {args.tokens} tokens, width {args.width}, vocabulary {args.vocab}, fp32")
    print(f"{'loss':8} {'peak MiB':>9} {'tokens/s':>9}")
    for v in variants:
        print(f"{v:8} {memory[v] / 2**20:9.0f} {rate[v]:9.0f}")
    ratios = {"memory": memory["chunked"] / memory["full"], "tokens_per_s": rate["chunked"] / rate["full"]}
    print(
        f"chunked / full: memory {ratios['memory']:.2f}x (target <= 0.3), tokens/s {ratios['tokens_per_s']:.2f}x"
        " (target >= 0.95)"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"peak_bytes": memory, "tokens_per_s": rate, "ratios": ratios}, indent=1)
        )


if __name__ == "__main__":
    main()

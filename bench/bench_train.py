"""Training throughput and MFU: teleflm's trainer vs transformers' LlamaForCausalLM with a plain AdamW
loop, on the same shapes and batches, eager and compiled, fp32 and bf16, at sizes from 1M to 100M
parameters, in one run.

    .venv/bin/python -m bench.bench_train [--sizes 1M,10M,100M] [--modes eager,compiled] [--json out.json]

MFU is measured against the bf16 (and fp32) matmul peak measured at the start of the same run.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from teleflm.config import build
from teleflm.data.synthetic import ArrayStream
from teleflm.model.size import flops_per_token
from teleflm.train.config import TrainConfig
from teleflm.train.precision import bf16_is_fast, matmul_rate
from teleflm.train.trainer import Trainer

# name: (model shape, context, sequences per step, timed steps)
SIZES = {
    "1M": (
        dict(
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=2,
            vocab_size=2048,
        ),
        256,
        8,
        12,
    ),
    "10M": (
        dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=2,
            vocab_size=8192,
        ),
        256,
        8,
        12,
    ),
    "100M": (
        dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=12,
            vocab_size=16384,
        ),
        256,
        2,
        16,
    ),
}


def batches(size: str) -> np.ndarray:
    shape, context, batch, steps = SIZES[size]
    return np.random.default_rng(0).integers(4, shape["vocab_size"], size=(steps * batch, context + 1))


def ours(size: str, dtype: str, compile: bool) -> float:
    """Median tokens/s of teleflm's Trainer (its whole step: data, forward/backward, clip, AdamW, logs)."""
    shape, context, batch, steps = SIZES[size]
    with tempfile.TemporaryDirectory() as out:
        raw = {
            "out": out,
            "model": {**shape, "max_position_embeddings": context, "use_mup": True, "mup_scale_factor": 0.5},
            "data": {"context_length": context},
            "batch": {"global_batch_tokens": context * batch, "micro_batch_size": batch},
            "schedule": {"total_tokens": context * batch * steps, "warmup_steps": 2},
            "parallel": {"mixed_precision": dtype, "compile": compile},
            "checkpoint": {"interval_steps": 10**9, "export_at_end": False},
            "logging": {"progress_bar": False},
            "stability": {"warmup_steps": 10**9},
        }
        cfg = build(TrainConfig, raw, "bench")
        data = batches(size)
        trainer = Trainer(cfg, stream_factory=lambda r, n: ArrayStream(data, r, n))
        trainer.checkpoint_root.mkdir(parents=True)
        trainer.save_checkpoint = lambda: trainer.checkpoint_root  # time training, not disk writes
        trainer.run()
        rates = [
            json.loads(line)["tokens_per_s"]
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
        ]
    return statistics.median(rates[len(rates) // 2 :])


def reference(size: str, dtype: str, compile: bool, fused: bool = False) -> float:
    """Median tokens/s of LlamaForCausalLM + torch.optim.AdamW + clip, the loop a user would write;
    `fused`: with AdamW's fused kernel, as teleflm's trainer uses it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape, context, batch, steps = SIZES[size]
    device = torch.accelerator.current_accelerator() or torch.device("cpu")  # the trainer's choice
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(**shape, max_position_embeddings=context, rms_norm_eps=1e-5, attn_implementation="sdpa")
    ).to(device)
    if compile:
        for layer in model.model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    data = torch.from_numpy(batches(size)).to(device)
    rates = []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens = data[step * batch : (step + 1) * batch]
        with autocast:
            logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        rates.append(context * batch / (time.perf_counter() - t0))
    return statistics.median(rates[len(rates) // 2 :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"of {list(SIZES)}")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--steps", type=int, help="timed steps (default: per size)")
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the two this many times; the best round counts"
    )
    parser.add_argument(
        "--llama-optimizer",
        choices=["default", "fused"],
        default="default",
        help="the reference's AdamW: torch's default or fused (teleflm's), to see what the optimizer gains",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.steps:
        for size, (shape, context, batch, _) in SIZES.items():
            SIZES[size] = (shape, context, batch, args.steps)
    from teleflm.model import TeleFLMConfig
    from teleflm.model.size import parameter_counts

    native_bf16 = bf16_is_fast()
    peak = {
        "fp32": matmul_rate(torch.float32),
        # emulated bf16 (about 1 GFLOP/s) is measured on a small matmul, or this line takes minutes
        "bf16": matmul_rate(torch.bfloat16, **({} if native_bf16 else dict(n=512, repeats=1, trials=1))),
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"matmul peak: bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s")
    dtypes = ["fp32", "bf16"]
    if not native_bf16:
        print("bf16: skipped, this CPU emulates bf16 matmuls far below its fp32 rate (peaks above)")
        dtypes.remove("bf16")
    print(f"AdamW: teleflm fused, LlamaForCausalLM {args.llama_optimizer}")
    rows = []
    print(
        f"{'size':>5} {'params':>7} {'tokens':>9} {'dtype':5} {'mode':8} {'teleflm tok/s':>14} {'llama tok/s':>12} {'ratio':>6} {'MFU':>6}"
    )
    for size in args.sizes.split(","):
        shape, context, batch, _ = SIZES[size]
        config = TeleFLMConfig(**shape)
        params, fpt = parameter_counts(config)["total"], flops_per_token(config, context)
        for dtype in dtypes:
            for mode in args.modes.split(","):
                compile = mode == "compiled"
                a = b = 0.0
                for _ in range(args.rounds):  # a noisy neighbour only ever slows a round down
                    torch._dynamo.reset()  # each run compiles afresh, within dynamo's recompile limit
                    a = max(a, ours(size, dtype, compile))
                    torch._dynamo.reset()
                    b = max(b, reference(size, dtype, compile, args.llama_optimizer == "fused"))
                mfu = fpt * a / peak[dtype]
                rows.append(
                    dict(
                        size=size,
                        params=params,
                        dtype=dtype,
                        mode=mode,
                        teleflm=a,
                        llama=b,
                        ratio=a / b,
                        mfu=mfu,
                    )
                )
                print(
                    f"{size:>5} {params / 1e6:6.1f}M {batch:>3}x{context:<5} {dtype:5} {mode:8} {a:14.0f} {b:12.0f} {a / b:6.2f} {mfu:6.1%}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"peak_flops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

"""Generation speed: teleflm's model vs transformers' LlamaForCausalLM on the same weights, prefill and
decode tokens/s, batch 1 and 8, fp32 (KV cache, greedy).

    .venv/bin/python -m bench.bench_generate [--prompt 256 --new 64]
"""

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM

SHAPE = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
)


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speeds(model, batch: int, prompt: int, new: int) -> tuple[float, float]:
    ids = torch.randint(4, SHAPE["vocab_size"], (batch, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True)

    def generate():
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False
            )

    t_prefill = timed(prefill)
    t_total = timed(generate)
    return batch * prompt / t_prefill, batch * new / max(t_total - t_prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    ours = TeleFLMForCausalLM(TeleFLMConfig(**SHAPE)).eval()
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa")).eval()
    llama.load_state_dict(ours.state_dict())
    print(
        f"model: {SHAPE}; prompt {args.prompt}, {args.new} new tokens, fp32, {torch.get_num_threads()} threads"
    )
    print(f"{'batch':>5} {'phase':8} {'teleflm tok/s':>14} {'llama tok/s':>12} {'ratio':>6}")
    for batch in (1, 8):
        (p_ours, d_ours), (p_ref, d_ref) = (
            speeds(ours, batch, args.prompt, args.new),
            speeds(llama, batch, args.prompt, args.new),
        )
        print(f"{batch:5d} {'prefill':8} {p_ours:14.0f} {p_ref:12.0f} {p_ours / p_ref:6.2f}")
        print(f"{batch:5d} {'decode':8} {d_ours:14.0f} {d_ref:12.0f} {d_ours / d_ref:6.2f}")


if __name__ == "__main__":
    main()

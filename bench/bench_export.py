"""Export size and load time of a ~100M-parameter Tele-FLM (the muP proxy's shape, 8 layers, the 52B
checkpoint's padded vocabulary), for each format: our safetensors export (fp32, bf16), the official
pickled-shard layout, and transformers' own `from_pretrained(..., trust_remote_code=True)`. The
"load+fwd" column adds one forward pass of 64 tokens: transformers 5 leaves safetensors memory-mapped
and reads pages on first use, so its bare load time alone flatters it.

    .venv/bin/python -m bench.bench_export [--repeats 3] [--json out.json]
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM
from teleflm.model.io import export_hf, load_pretrained
from teleflm.testing import write_official_layout

CONFIG = dict(
    vocab_size=80384,
    hidden_size=512,
    intermediate_size=1344,
    num_hidden_layers=8,
    num_attention_heads=4,
    max_position_embeddings=4096,
    use_mup=True,
    output_mult=0.5,
    mup_scale_factor=1.0,
)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


PROBE = torch.arange(4, 68)[None]


def load_and_run(load):
    def run():
        model = load()
        with torch.no_grad():
            model(PROBE)

    return run


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--vocab", type=int, default=CONFIG["vocab_size"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = {**CONFIG, "num_hidden_layers": args.layers, "vocab_size": args.vocab}
    model = TeleFLMForCausalLM(TeleFLMConfig(**config)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rows = []

    def measure(name: str, folder: Path, write_s: float | None, load) -> None:
        load_s, _ = timed(load, args.repeats)
        run_s, _ = timed(load_and_run(load), args.repeats)
        rows.append(dict(format=name, mb=folder_mb(folder), write_s=write_s, load_s=load_s, run_s=run_s))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HF_HOME"] = str(tmp / "hf")  # transformers' module cache for remote code
        tokenizer_model = write_sentencepiece(tmp / "sp")
        for dtype in ("fp32", "bf16"):
            out = tmp / f"export-{dtype}"
            write_s, _ = timed(
                lambda out=out, dtype=dtype: export_hf(model, out, overwrite=True, dtype=dtype), 1
            )
            measure(
                f"safetensors export {dtype}",
                out,
                write_s,
                lambda out=out, dtype=dtype: load_pretrained(out, dtype=dtype, device="cpu")[0],
            )

        official = tmp / "official"
        write_s, _ = timed(lambda: write_official_layout(model.bfloat16(), tokenizer_model, official), 1)
        model.float()
        measure(
            "official .bin shards bf16",
            official,
            write_s,
            lambda: load_pretrained(official, dtype="bf16", device="cpu")[0],
        )

        from transformers import AutoModelForCausalLM

        measure(
            "transformers from_pretrained bf16",
            tmp / "export-bf16",
            None,
            lambda: AutoModelForCausalLM.from_pretrained(
                tmp / "export-bf16", dtype=torch.bfloat16, low_cpu_mem_usage=True, trust_remote_code=True
            ),
        )

    print(
        f"{n_params / 1e6:.1f}M parameters; {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'format':36} {'size MB':>8} {'write s':>8} {'load s':>7} {'load+fwd s':>10}")
    for r in rows:
        write = f"{r['write_s']:.2f}" if r["write_s"] is not None else "-"
        print(f"{r['format']:36} {r['mb']:8.1f} {write:>8} {r['load_s']:7.2f} {r['run_s']:10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": n_params, "config": config, "rows": rows}, indent=2))


def write_sentencepiece(folder: Path) -> Path:
    """A small SentencePiece model for the official layout's tokenizer.model (its size is irrelevant here)."""
    import sentencepiece as spm

    folder.mkdir()
    text = "\n".join(f"line {i} of a tiny corpus with some words in it" for i in range(2000))
    (folder / "text.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(folder / "text.txt"),
        model_prefix=str(folder / "sp"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return folder / "sp.model"


if __name__ == "__main__":
    main()

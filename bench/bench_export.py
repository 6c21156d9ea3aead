"""Export size and load time of a ~100M-parameter Tele-FLM (the muP proxy's shape, 8 layers, the 52B
checkpoint's padded vocabulary), for each format: our safetensors export (fp32, bf16), the official
pickled-shard layout, and transformers' own `from_pretrained(..., trust_remote_code=True)`.

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
from teleflm.model.io import export_hf, load_pretrained, write_official_layout

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
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TeleFLMForCausalLM(TeleFLMConfig(**CONFIG)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HF_HOME"] = str(tmp / "hf")  # transformers' module cache for remote code
        tokenizer_model = write_sentencepiece(tmp / "sp")
        for dtype in ("fp32", "bf16"):
            out = tmp / f"export-{dtype}"
            export_s, _ = timed(
                lambda out=out, dtype=dtype: export_hf(model, out, overwrite=True, dtype=dtype), 1
            )
            load_s, _ = timed(
                lambda out=out, dtype=dtype: load_pretrained(out, dtype=dtype, device="cpu"), args.repeats
            )
            rows.append(
                dict(format=f"safetensors export {dtype}", mb=folder_mb(out), write_s=export_s, load_s=load_s)
            )

        official = tmp / "official"
        write_s, _ = timed(lambda: write_official_layout(model.bfloat16(), tokenizer_model, official), 1)
        model.float()
        load_s, _ = timed(lambda: load_pretrained(official, dtype="bf16", device="cpu"), args.repeats)
        rows.append(
            dict(format="official .bin shards bf16", mb=folder_mb(official), write_s=write_s, load_s=load_s)
        )

        from transformers import AutoModelForCausalLM

        hf_s, _ = timed(
            lambda: AutoModelForCausalLM.from_pretrained(
                tmp / "export-bf16", dtype=torch.bfloat16, low_cpu_mem_usage=True, trust_remote_code=True
            ),
            args.repeats,
        )
        rows.append(
            dict(
                format="transformers from_pretrained bf16",
                mb=folder_mb(tmp / "export-bf16"),
                write_s=None,
                load_s=hf_s,
            )
        )

    print(
        f"{n_params / 1e6:.1f}M parameters; {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'format':36} {'size MB':>8} {'write s':>8} {'load s':>7}")
    for r in rows:
        write = f"{r['write_s']:.2f}" if r["write_s"] is not None else "-"
        print(f"{r['format']:36} {r['mb']:8.1f} {write:>8} {r['load_s']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": n_params, "config": CONFIG, "rows": rows}, indent=2))


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

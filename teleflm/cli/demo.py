"""`teleflm demo [--minutes N] [--out DIR]`: the whole system on the embedded sample, in one command.

Stages, each skipped when its output is already there (a re-run continues where it stopped):
sample corpus -> tokenizer -> shards with a held-out split -> muP training (the token budget set from
the time budget) -> bits per byte per domain beside xz -9 and gzip -9 -> generations -> Hugging Face
export -> report.md with figures and plots.
"""

import gzip
import json
import lzma
import shutil
import sys
import time
from importlib.resources import files
from pathlib import Path

DEMO_CONFIG = files("teleflm.cli") / "demo.toml"
VOCAB_SIZE = 8000  # the tokenizer's entries; the model pads its embedding to 8192
PROMPTS = {"English": "And God said unto Moses,", "Chinese": "床前明月光，", "code": "def __init__(self,"}
# Shares of the time budget: everything but training is measured in seconds.
TRAIN_SHARE = 0.75
DISK_NEEDED = 400 * 2**20  # corpus, shards, checkpoints (3 x 3 x ~14 MB), export: well under this


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny muP Tele-FLM on the embedded sample, end to end")
    p.add_argument("--minutes", type=float, default=10.0, help="time budget of the whole demo (default 10)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.set_defaults(func=run)


def check_out_dir(out: Path) -> None:
    """Refuse an unusable output folder before any work."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    parent = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    probe = parent / f".teleflm-write-test-{time.time_ns()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise PermissionError(f"--out {out}: cannot write in {parent} ({e.strerror})") from None
    free = shutil.disk_usage(parent).free
    if free < DISK_NEEDED:
        raise OSError(
            f"--out {out}: {free / 2**20:.0f} MiB free on its disk, the demo needs about {DISK_NEEDED / 2**20:.0f} MiB"
        )


def stage(name: str) -> None:
    print(f"\n== {name}", flush=True)


def token_budget(cfg, seconds: float) -> int:
    """Tokens the CPU trains in `seconds`: the matmul rate measured now x a utilisation the trainer
    reaches on this model (about half the matmul rate, measured on 2 cores), rounded down to whole steps (at least 20 steps)."""
    import torch

    from teleflm.model.size import flops_per_token

    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(8):
        a @ b
    flops = 2 * n**3 * 8 / (time.perf_counter() - t0)
    tokens_per_s = 0.5 * flops / flops_per_token(cfg.model_config(), cfg.data.context_length)
    steps = max(20, int(seconds * tokens_per_s) // cfg.batch.global_batch_tokens)
    return steps * cfg.batch.global_batch_tokens


def compressed_bpb(text: bytes) -> dict[str, float]:
    return {
        "xz -9": 8 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) / len(text),
        "gzip -9": 8 * len(gzip.compress(text, compresslevel=9)) / len(text),
    }


def run(args) -> int:
    from teleflm.data.prepare import prepare
    from teleflm.data.sample import write_sample_corpus
    from teleflm.data.tokenizer import train_tokenizer
    from teleflm.train.config import load_config
    from teleflm.train.trainer import Trainer

    out: Path = args.out
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    budget = args.minutes * 60

    stage("1/6 sample corpus (KJV, Tang and Song poems, Python standard library)")
    data_toml = out / "corpus" / "data.toml"
    if not data_toml.exists():
        write_sample_corpus(out / "corpus")
    print(f"corpus: {data_toml.parent}")

    stage(f"2/6 byte-level BPE tokenizer ({VOCAB_SIZE} entries)")
    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        train_tokenizer(
            sorted(str(p) for p in (out / "corpus").glob("*/*") if p.is_file()), VOCAB_SIZE, tokenizer
        )
    print(f"tokenizer: {tokenizer}")

    stage("3/6 token shards with a held-out split")
    shards = out / "shards"
    prepare(data_toml, tokenizer=tokenizer, out=shards)

    stage("4/6 training a tiny muP Tele-FLM")
    state_file = out / "demo.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    overrides = [f"out='{out / 'run'}'", f"data.shards='{shards}'", f"data.tokenizer='{tokenizer}'"]
    cfg = load_config(DEMO_CONFIG, overrides)
    if "total_tokens" not in state:  # fixed at the first run, so a re-run resumes the same schedule
        elapsed = time.time() - started
        state["total_tokens"] = token_budget(cfg, max(budget * TRAIN_SHARE - elapsed, 10))
        state_file.write_text(json.dumps(state))
    cfg = load_config(DEMO_CONFIG, [*overrides, f"schedule.total_tokens={state['total_tokens']}"])
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, cfg.total_steps() // 5)
    cfg.checkpoint.interval_steps = max(cfg.total_steps() // 3, 1)
    cfg.logging.eval_interval = cfg.checkpoint.interval_steps
    print(
        f"{cfg.total_steps()} steps of {cfg.batch.global_batch_tokens} tokens, {cfg.model_config().num_hidden_layers} layers"
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    model_bpb = {k.split(".")[1]: v for k, v in result.items() if k.count(".") == 2 and k.endswith(".bpb")}

    stage("5/6 bits per byte on held-out text, beside xz -9 and gzip -9")
    figures = held_out_figures(trainer, model_bpb)
    for domain, row in figures.items():
        print(
            f"{domain:10s} model {row['model']:.3f}  xz -9 {row['xz -9']:.3f}  gzip -9 {row['gzip -9']:.3f}  bits/byte"
        )

    stage("6/6 generations from the export, and the report")
    samples, cache_mismatch = generate_samples(out / "run" / "export")
    for name, text in samples.items():
        print(f"[{name}] {text!r}")
    print(
        f"KV cache: cached greedy decoding == uncached on {len(samples) - len(cache_mismatch)} of "
        f"{len(samples)} prompts"
    )
    n_params = sum(p.numel() for p in trainer.module.parameters())
    report = write_report(out, cfg, n_params, result, figures, samples, cache_mismatch, time.time() - started)
    print(
        f"\nreport: {report}\nexport: {out / 'run' / 'export'} (loads with transformers, trust_remote_code=True)"
    )
    if cache_mismatch:
        print(
            f"error: decoding with the KV cache differs from without it on {cache_mismatch}", file=sys.stderr
        )
        return 1
    return 0


def held_out_figures(trainer, model_bpb: dict[str, float]) -> dict[str, dict]:
    """Per domain: the model's BPB and what xz -9 / gzip -9 reach on the very same held-out documents."""
    from teleflm.data.tokenizer import load_tokenizer
    from teleflm.eval.bpb import eval_windows

    tokenizer = load_tokenizer(trainer.cfg.data.tokenizer)
    figures = {}
    for domain, bpb in model_bpb.items():
        docs = list(trainer.shards.documents(domain, "val"))
        *_, n_bytes, n_docs = eval_windows(
            docs, trainer.cfg.data.context_length, trainer.cfg.logging.eval_sequences
        )
        text = "".join(tokenizer.decode(doc.tolist()) for doc, _ in docs[:n_docs]).encode()
        if len(text) != n_bytes:
            raise RuntimeError(
                f"{domain}: held-out text decodes to {len(text)} bytes, the shards record {n_bytes}"
            )
        figures[domain] = {"model": bpb, **compressed_bpb(text), "bytes": n_bytes}
    return figures


def generate_samples(export: Path) -> tuple[dict[str, str], list[str]]:
    """Greedy continuations of PROMPTS from the export, and the prompts on which decoding with the KV
    cache gave other tokens than decoding without it (a cache that transformers fails to hand the
    model reads as garbage only after the first token)."""
    import torch

    from teleflm.data.tokenizer import padded_ids
    from teleflm.model.io import load_pretrained

    model, tokenizer = load_pretrained(export, dtype="fp32", device="cpu")
    padded = padded_ids(tokenizer, model.config.vocab_size)
    samples, mismatch = {}, []
    for name, prompt in PROMPTS.items():
        inputs = tokenizer(prompt, return_tensors="pt")
        settings = dict(max_new_tokens=40, do_sample=False, repetition_penalty=1.03)
        with torch.no_grad():
            ids = model.generate(**inputs, **settings, suppress_tokens=padded or None)
            uncached = model.generate(**inputs, **settings, suppress_tokens=padded or None, use_cache=False)
        if not torch.equal(ids, uncached):
            mismatch.append(name)
        samples[name] = prompt + tokenizer.decode(
            ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return samples, mismatch


def write_report(
    out: Path,
    cfg,
    n_params: int,
    result: dict,
    figures: dict,
    samples: dict,
    cache_mismatch: list[str],
    seconds: float,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(figures)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.27
    for i, key in enumerate(["model", "xz -9", "gzip -9"]):
        ax.bar(
            [d + i * width for d in range(len(domains))], [figures[d][key] for d in domains], width, label=key
        )
    ax.set_xticks([d + width for d in range(len(domains))], domains)
    ax.set_ylabel("bits per byte (held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bpb.png", dpi=110)
    plt.close(fig)
    shutil.copy(out / "run" / "loss.png", out / "loss.png")

    mc = cfg.model_config()
    rows = "\n".join(
        f"| {d} | {f['model']:.3f} | {f['xz -9']:.3f} | {f['gzip -9']:.3f} | {f['bytes']:,} |"
        for d, f in figures.items()
    )
    gens = "\n".join(f"- **{name}**: `{text!r}`" for name, text in samples.items())
    cache = (
        f"Decoding with the KV cache gave the same tokens as decoding without it on every prompt "
        f"({len(samples)} of {len(samples)})."
        if not cache_mismatch
        else f"**Decoding with the KV cache differed from decoding without it on {cache_mismatch}.**"
    )
    text = f"""# teleflm demo report

A muP Tele-FLM of {n_params / 1e6:.1f}M parameters ({mc.num_hidden_layers} layers, width {mc.hidden_size},
logit scale {mc.output_mult}/{mc.mup_scale_factor}) trained for {result["step"]} steps, {result["tokens"]:,} tokens,
on the embedded sample (English KJV, Chinese poems, Python code); the whole demo took {seconds / 60:.1f} minutes.

Final training loss: {result["loss"]:.4f} nats/token.

## Bits per byte on held-out documents

Lower is better. xz and gzip compress exactly the documents the model was scored on.

| domain | model | xz -9 | gzip -9 | bytes |
|---|---|---|---|---|
{rows}

![bits per byte](bpb.png)

## Loss curve

![loss](loss.png)

Per-step data: `run/metrics.jsonl` (and TensorBoard logs in `run/tensorboard`); events in `run/events.jsonl`.

## Greedy generations (from the export, repetition penalty 1.03)

{gens}

{cache}

## Export

`run/export` is a Hugging Face folder; plain transformers loads it:

```python
from transformers import AutoTokenizer, AutoModelForCausalLM
tok = AutoTokenizer.from_pretrained("{out / "run" / "export"}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{out / "run" / "export"}", trust_remote_code=True)
```
"""
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps(
            {"result": result, "bpb": figures, "samples": samples, "cache_mismatch": cache_mismatch},
            indent=1,
        )
    )
    return out / "report.md"

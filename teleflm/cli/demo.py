"""`teleflm demo [--minutes N] [--out DIR]`: the whole system on the embedded sample, in one command.

Stages, each skipped when its output is already there (a re-run continues where it stopped):
sample corpus -> tokenizer -> shards with a held-out split -> muP training for the time left (the
machine's step rate, evaluation and checkpoint times measured on a few warm-up steps first; bf16 where
this machine runs it natively; compiled where that measures faster) -> bits per byte per domain
beside xz -9 and gzip -9 -> generations -> Hugging Face export -> report.md with figures and plots.
"""

import copy
import json
import shutil
import sys
import time
from importlib.resources import files
from pathlib import Path

DEMO_CONFIG = files("teleflm.cli") / "demo.toml"
VOCAB_SIZE = 8000  # the tokenizer's entries; the model pads its embedding to 8192
PROMPTS = {"English": "And God said unto Moses,", "Chinese": "床前明月光，", "code": "def __init__(self,"}
# Calibration: steps timed away (first-touch allocations), then steps whose median time counts. It
# plans the run (its evaluation and checkpoint intervals); a Deadline then keeps it to the budget.
WARMUP_STEPS, TIMED_STEPS = 2, 4
# The stages after training beyond its evaluations and checkpoints (export, figures, generations from
# the export, report): about 15 s on 2 cores, with room to spare.
TAIL_SECONDS = 25
BUDGET_SHARE = 0.95  # aim below the budget: the step rate wanders with the machine's load
MIN_STEPS = 10
EVALUATIONS = 3  # during training (also checkpoints), besides the final one
# Compiling is measured only with this much time left: a first compile took about 40 s on 2 cores (it
# is cached for later runs), for steps up to 1.4x faster (1.02x at width 128 on 2026-12-04), so a
# shorter demo would lose by it.
COMPILE_MIN_SECONDS = 240
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


def calibrate(cfg, out: Path) -> dict[str, float]:
    """Seconds per training step, per held-out evaluation and per checkpoint of `cfg` on this machine
    now, from a throwaway run of a few steps (its folder is removed)."""
    import statistics

    from teleflm.train.trainer import Trainer

    cfg = copy.deepcopy(cfg)
    cfg.out = str(out)
    cfg.schedule.total_tokens = (WARMUP_STEPS + TIMED_STEPS) * cfg.batch.global_batch_tokens
    cfg.schedule.warmup_steps = 1
    cfg.checkpoint.export_at_end = False
    cfg.logging.eval_interval = 0
    cfg.logging.progress_bar = False
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(cfg)
    trainer.run()  # its last step writes a checkpoint and evaluates: both warmed up below
    rates = [
        json.loads(line).get("tokens_per_s") for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    timed = [r for r in rates if r][WARMUP_STEPS:]
    times = {"step": cfg.batch.global_batch_tokens / statistics.median(timed)}
    for name, call in (("evaluation", trainer.evaluate), ("checkpoint", trainer.save_checkpoint)):
        started = time.perf_counter()
        call()
        times[name] = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    return times


def steps_for(seconds: float, times: dict[str, float]) -> int:
    """Training steps that fit in `seconds` with the evaluations and checkpoints along the way."""
    fixed = (EVALUATIONS + 1) * times["evaluation"] + EVALUATIONS * times["checkpoint"] + TAIL_SECONDS
    return max(MIN_STEPS, int((seconds - fixed) / times["step"]))


def sample_shards(out: Path) -> tuple[Path, Path]:
    """Stages 1-3: the embedded sample as a corpus, a tokenizer trained on it, token shards with a
    held-out split (each kept when already there); returns (shards, tokenizer) folders."""
    from teleflm.data.prepare import prepare
    from teleflm.data.sample import write_sample_corpus
    from teleflm.data.tokenizer import train_tokenizer

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
    return shards, tokenizer


def choose_compile(
    cfg, out: Path, eager: dict[str, float], finish_by: float
) -> tuple[bool, dict[str, float]]:
    """Whether to train compiled, and the times to plan by: compiled layers are calibrated beside the
    eager ones when time allows, and win when they fit more steps in what is left after measuring."""
    if finish_by - time.time() < COMPILE_MIN_SECONDS:
        return False, eager
    compiled_cfg = copy.deepcopy(cfg)
    compiled_cfg.parallel.compile = True
    try:
        compiled = calibrate(compiled_cfg, out)
    except Exception as error:  # no C++ compiler, an inductor failure: eager still trains
        print(f"compiled layers failed ({type(error).__name__}: {str(error)[:200]}); training eagerly")
        return False, eager
    left = finish_by - time.time()
    faster = steps_for(left, compiled) > steps_for(left, eager)
    print(
        f"compiled: {compiled['step']:.2f} s per step against {eager['step']:.2f} eager: "
        f"{'compiled' if faster else 'eager'}"
    )
    return faster, compiled if faster else eager


def training_config(out: Path, shards: Path, tokenizer: Path, state: dict, finish_by: float):
    """The demo's TrainConfig. On the first call (an empty `state`) it picks the precision, measures
    the machine on a few warm-up steps and sizes the schedule to end by `finish_by` (a time.time()), recording all of it
    in `state`, so that a re-run resumes the same schedule."""
    from teleflm.train.config import load_config
    from teleflm.train.precision import bf16_is_fast

    overrides = [f"out='{out / 'run'}'", f"data.shards='{shards}'", f"data.tokenizer='{tokenizer}'"]
    if "total_tokens" not in state:
        state["mixed_precision"] = "bf16" if bf16_is_fast() else "fp32"
        cfg = load_config(DEMO_CONFIG, [*overrides, f"parallel.mixed_precision='{state['mixed_precision']}'"])
        times = calibrate(cfg, out / "calibration")
        state["compile"], times = choose_compile(cfg, out / "calibration", times, finish_by)
        seconds_left = finish_by - time.time()
        state["total_tokens"] = steps_for(seconds_left, times) * cfg.batch.global_batch_tokens
        state["calibration"] = times
        print(
            f"measured: {times['step']:.2f} s per step ({state['mixed_precision']}"
            f"{', compiled' if state['compile'] else ''}), {times['evaluation']:.1f} s per evaluation, "
            f"{times['checkpoint']:.1f} s per checkpoint; {seconds_left:.0f} s left"
        )
    overrides += [
        f"parallel.mixed_precision='{state['mixed_precision']}'",
        f"parallel.compile={str(state.get('compile', False)).lower()}",
        f"schedule.total_tokens={state['total_tokens']}",
    ]
    cfg = load_config(DEMO_CONFIG, overrides)
    cfg.schedule.warmup_steps = min(cfg.schedule.warmup_steps, cfg.total_steps() // 5)
    cfg.checkpoint.interval_steps = max(cfg.total_steps() // EVALUATIONS, 1)
    cfg.logging.eval_interval = cfg.checkpoint.interval_steps
    print(
        f"{cfg.total_steps()} steps of {cfg.batch.global_batch_tokens} tokens, "
        f"{cfg.model_config().num_hidden_layers} layers, {cfg.parallel.mixed_precision}"
        f"{', compiled' if cfg.parallel.compile else ''}"
    )
    return cfg


def run(args) -> int:
    from teleflm.eval.samples import greedy_samples
    from teleflm.train.deadline import Deadline
    from teleflm.train.trainer import Trainer

    out: Path = args.out
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be positive, got {args.minutes}")
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    budget = args.minutes * 60
    shards, tokenizer = sample_shards(out)

    stage("4/6 training a tiny muP Tele-FLM")
    state_file = out / "demo.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    cfg = training_config(out, shards, tokenizer, state, finish_by=started + budget * BUDGET_SHARE)
    state_file.write_text(json.dumps(state))
    trainer = Trainer(cfg)
    if not state.get("trained"):  # the end moves with the measured step rate, to finish in the budget
        times = state["calibration"]
        trainer.deadline = Deadline(
            started + budget * BUDGET_SHARE, times["evaluation"], times["checkpoint"], TAIL_SECONDS, MIN_STEPS
        )
    result = trainer.run()
    state.update(trained=True, total_tokens=trainer.cfg.schedule.total_tokens)  # a re-run trains no further
    state_file.write_text(json.dumps(state))
    model_bpb = {k.split(".")[1]: v for k, v in result.items() if k.count(".") == 2 and k.endswith(".bpb")}

    stage("5/6 bits per byte on held-out text, beside xz -9 and gzip -9")
    figures = held_out_figures(trainer, model_bpb)
    for domain, row in figures.items():
        print(
            f"{domain:10s} model {row['model']:.3f}  xz -9 {row['xz -9']:.3f}  gzip -9 {row['gzip -9']:.3f}  bits/byte"
        )

    stage("6/6 generations from the export, and the report")
    samples, cache_mismatch = greedy_samples(out / "run" / "export", PROMPTS)
    for name, text in samples.items():
        print(f"[{name}] {text!r}")
    print(
        f"KV cache: cached greedy decoding == uncached on {len(samples) - len(cache_mismatch)} of "
        f"{len(samples)} prompts"
    )
    n_params = sum(p.numel() for p in trainer.module.parameters())
    report = write_report(
        out, cfg, n_params, result, figures, samples, cache_mismatch, time.time() - started, budget
    )
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
    from teleflm.eval.bpb import compressor_bpb, held_out_bytes

    tokenizer = load_tokenizer(trainer.cfg.data.tokenizer)
    figures = {}
    for domain, bpb in model_bpb.items():
        docs = trainer.shards.documents(domain, "val")
        text = held_out_bytes(
            docs, tokenizer, trainer.cfg.data.context_length, trainer.cfg.logging.eval_sequences
        )
        figures[domain] = {"model": bpb, **compressor_bpb(text), "bytes": len(text)}
    return figures


def plot_bpb(figures: dict[str, dict], path: Path) -> None:
    """Bars of held-out bits per byte per domain: the model beside xz -9 and gzip -9."""
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    out: Path,
    cfg,
    n_params: int,
    result: dict,
    figures: dict,
    samples: dict,
    cache_mismatch: list[str],
    seconds: float,
    budget: float,
) -> Path:
    plot_bpb(figures, out / "bpb.png")
    shutil.copy(out / "run" / "loss.png", out / "loss.png")

    mc = cfg.model_config()
    precision = cfg.parallel.mixed_precision + (", compiled" if cfg.parallel.compile else "")
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
    context, stride = cfg.data.context_length, cfg.logging.eval_stride or cfg.data.context_length
    scoring = (
        f"The model read them in windows of {context} tokens, each {stride} after the last, so every token "
        f"was scored once after at least {context - stride} tokens of context (xz and gzip see all before it)."
        if stride < context
        else f"The model read them in windows of {context} tokens laid end to end."
    )
    text = f"""# teleflm demo report

A muP Tele-FLM of {n_params / 1e6:.1f}M parameters ({mc.num_hidden_layers} layers, width {mc.hidden_size},
logit scale {mc.output_mult}/{mc.mup_scale_factor}) trained for {result["step"]} steps, {result["tokens"]:,} tokens,
on the embedded sample (English KJV, Chinese poems, Python code) in {precision}; the whole demo took
{seconds / 60:.1f} minutes of its {budget / 60:.1f}.

Final training loss: {result["loss"]:.4f} nats/token.

## Bits per byte on held-out documents

Lower is better. xz and gzip compress exactly the documents the model was scored on. {scoring}

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
            {
                "result": result,
                "bpb": figures,
                "samples": samples,
                "cache_mismatch": cache_mismatch,
                "seconds": seconds,
                "budget_seconds": budget,
            },
            indent=1,
        )
    )
    return out / "report.md"

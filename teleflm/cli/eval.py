"""`teleflm eval bpb`: held-out bits per byte per domain of a checkpoint or an export;
`teleflm eval harness`: lm-evaluation-harness on local tasks, with BPB in the same report."""

import argparse
import json
import math
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    bpb = evals.add_parser("bpb", help="bits per byte per domain on the held-out split of prepared shards")
    bpb.add_argument(
        "--model", required=True, help="a teleflm checkpoint folder (step-N) or a Hugging Face export"
    )
    bpb.add_argument("--data", required=True, help="shards folder made by `teleflm data prepare`")
    bpb.add_argument("--split", default="val")
    bpb.add_argument(
        "--context-length",
        type=int,
        default=0,
        help="default: a checkpoint's training context, else the model's max positions, at most 1024",
    )
    bpb.add_argument(
        "--max-windows",
        type=int,
        default=0,
        help="windows of context-length tokens per domain (default: a checkpoint's eval_sequences, else 64)",
    )
    bpb.add_argument(
        "--document-mask",
        action=argparse.BooleanOptionalAction,
        help="attend within documents only (default: as a checkpoint's run trained, else off)",
    )
    bpb.add_argument(
        "--stride",
        type=int,
        help="tokens between overlapping windows, each token scored once with more context "
        "(default: a checkpoint's eval_stride, else the context length: windows end to end)",
    )
    bpb.add_argument("--batch-size", type=int, default=8)
    bpb.add_argument("--json", type=Path, help="also write the results here")
    bpb.set_defaults(func=run_bpb)

    harness = evals.add_parser(
        "harness", help="lm-evaluation-harness on local tasks (teleflm/eval/tasks), one report with BPB"
    )
    harness.add_argument("--model", required=True, help="a Hugging Face export (`teleflm export`)")
    harness.add_argument(
        "--tasks",
        required=True,
        help="comma-separated task names, e.g. teleflm_kjv_next_verse,teleflm_poem_next_line",
    )
    harness.add_argument(
        "--include", action="append", default=[], metavar="DIR", help="another folder of task YAML files"
    )
    harness.add_argument("--limit", type=int, help="score only the first N items of each task")
    harness.add_argument("--batch-size", type=int, default=8)
    harness.add_argument("--data", help="shards folder: add held-out bits per byte to the report")
    harness.add_argument("--max-windows", type=int, default=64, help="BPB windows per domain (with --data)")
    harness.add_argument("--out", type=Path, required=True, help="folder for report.md and report.json")
    harness.set_defaults(func=run_harness)


def eval_defaults(model_path, model) -> dict:
    """What a run's own evaluation scored (a checkpoint records it), else context = the model's max
    positions (at most 1024), 64 windows, no document mask, windows end to end."""
    from teleflm.train.checkpoint import TRAINER_STATE

    state = Path(model_path) / TRAINER_STATE
    recorded = json.loads(state.read_text()).get("eval") if state.is_file() else None
    fallback = {
        "context_length": min(model.config.max_position_embeddings, 1024),
        "max_windows": 64,
        "document_mask": False,
        "stride": 0,
    }
    return recorded or fallback


def bpb_by_domain(
    model_path,
    data,
    split="val",
    context_length=0,
    max_windows=0,
    batch_size=8,
    document_mask=None,
    stride=None,
) -> tuple[dict, float]:
    """(per-domain BPB results, byte-weighted BPB over all domains), printed as they come with the
    documents and bytes scored: the first documents of each domain's split that fill the windows."""
    from teleflm.data.shards import open_shards
    from teleflm.data.tokenizer import load_tokenizer, tokenizer_hash
    from teleflm.eval.bpb import bits_per_byte
    from teleflm.model.loss import token_loss_sum
    from teleflm.train.attention import document_attention
    from teleflm.train.checkpoint import load_any_model

    model, _, tokenizer_dir = load_any_model(model_path)
    if tokenizer_dir is None:
        raise ValueError(f"{model_path} names no tokenizer: BPB needs the one the shards were made with")
    shards = open_shards(data, expected_tokenizer_hash=tokenizer_hash(tokenizer_dir))
    defaults = eval_defaults(model_path, model)
    context = context_length or defaults["context_length"]
    windows = max_windows or defaults["max_windows"]
    masked = defaults["document_mask"] if document_mask is None else document_mask
    stride = defaults.get("stride", 0) if stride is None else stride
    real_vocab = len(load_tokenizer(tokenizer_dir))

    def loss(x, targets, doc_ids):
        mask = document_attention(doc_ids) if doc_ids is not None else None
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        return token_loss_sum(logits, targets, real_vocab)

    overlap = f", each {stride} after the last" if stride and stride < context else ""
    print(
        f"{split} split: the first documents of each domain filling {windows} windows of {context} tokens{overlap}"
    )
    results, bits, n_bytes = {}, 0.0, 0
    for domain in shards.domains:
        r = bits_per_byte(
            loss,
            shards.documents(domain, split),
            context,
            max_windows=windows,
            batch_size=batch_size,
            device=model.device,
            document_mask=masked,
            stride=stride,
        )
        results[domain] = r
        if r["bytes"]:
            bits += r["bpb"] * r["bytes"]
            n_bytes += r["bytes"]
        print(
            f"{domain:24s} {r['bpb']:.4f} bits/byte  ({r['documents']} documents, {r['tokens']} tokens, "
            f"{r['bytes']} bytes)"
        )
    overall = bits / n_bytes if n_bytes else math.nan
    print(f"{'all':24s} {overall:.4f} bits/byte  ({n_bytes} bytes)")
    return results, overall


def run_bpb(args) -> int:
    results, overall = bpb_by_domain(
        args.model,
        args.data,
        args.split,
        args.context_length,
        args.max_windows,
        args.batch_size,
        args.document_mask,
        args.stride,
    )
    if args.json:
        args.json.write_text(json.dumps({"domains": results, "bpb": overall}, indent=1))
    return 0 if math.isfinite(overall) else 1


def run_harness(args) -> int:
    from teleflm.eval.harness import run_harness as harness
    from teleflm.eval.report import write_report

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    scores = harness(args.model, tasks, args.include, args.limit, args.batch_size)
    bpb = None
    if args.data:
        domains, overall = bpb_by_domain(args.model, args.data, max_windows=args.max_windows)
        bpb = {"domains": domains, "bpb": overall}
    markdown = write_report(args.out, str(args.model), scores, bpb)
    print(markdown)
    return 0

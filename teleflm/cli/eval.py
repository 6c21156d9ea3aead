"""`teleflm eval bpb`: held-out bits per byte per domain of a checkpoint or an export."""

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
        "--context-length", type=int, default=0, help="default: the model's max positions, at most 1024"
    )
    bpb.add_argument(
        "--max-windows", type=int, default=64, help="windows of context-length tokens per domain"
    )
    bpb.add_argument("--batch-size", type=int, default=8)
    bpb.add_argument("--json", type=Path, help="also write the results here")
    bpb.set_defaults(func=run_bpb)


def run_bpb(args) -> int:

    from teleflm.cli.common import load_model_any
    from teleflm.data.shards import open_shards
    from teleflm.data.tokenizer import load_tokenizer, tokenizer_hash
    from teleflm.eval.bpb import bits_per_byte

    model, _, tokenizer_dir = load_model_any(args.model)
    if tokenizer_dir is None:
        raise ValueError(f"{args.model} names no tokenizer: BPB needs the one the shards were made with")
    shards = open_shards(args.data, expected_tokenizer_hash=tokenizer_hash(tokenizer_dir))
    device = model.device
    context = args.context_length or min(model.config.max_position_embeddings, 1024)
    real_vocab = len(load_tokenizer(tokenizer_dir))
    results, bits, n_bytes = {}, 0.0, 0
    for domain in shards.domains:
        r = bits_per_byte(
            lambda x: model(input_ids=x, use_cache=False).logits,
            shards.documents(domain, args.split),
            context,
            real_vocab,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
            device=device,
        )
        results[domain] = r
        bits += r["bpb"] * r["bytes"]
        n_bytes += r["bytes"]
        print(f"{domain:24s} {r['bpb']:.4f} bits/byte  ({r['tokens']} tokens, {r['bytes']} bytes)")
    overall = bits / max(n_bytes, 1)
    print(f"{'all':24s} {overall:.4f} bits/byte")
    if args.json:
        args.json.write_text(json.dumps({"domains": results, "bpb": overall}, indent=1))
    return 0 if math.isfinite(overall) else 1

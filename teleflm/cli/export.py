"""`teleflm export --model PATH --out DIR`: a Hugging Face folder that plain transformers loads."""


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a model as a Hugging Face folder (safetensors + model code)")
    p.add_argument(
        "--model",
        "--checkpoint",
        dest="model",
        required=True,
        metavar="PATH",
        help="a training checkpoint (step-N folder), one of our exports, or the official layout",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="folder with tokenizer.json or tokenizer.model (default: the model folder's, if any)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], help="dtype of the exported weights (default: as stored)"
    )
    p.add_argument("--max-shard-size", default="2GB", help="split the weights past this size (default 2GB)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from teleflm.model.io import check_export_target, export_hf
    from teleflm.train.checkpoint import load_any_model

    # Refuse a bad target before spending time on loading.
    check_export_target(Path(args.out), args.overwrite)
    model, _, model_tokenizer_dir = load_any_model(args.model, dtype=args.dtype or "fp32", device="cpu")
    tokenizer_dir = args.tokenizer or model_tokenizer_dir
    out = export_hf(
        model,
        args.out,
        tokenizer_dir=tokenizer_dir,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"exported {n_params / 1e6:.1f}M parameters to {out}" + ("" if tokenizer_dir else " (no tokenizer)")
    )
    return 0

"""`teleflm tokenizer train` and `teleflm data prepare`."""

from pathlib import Path


def add_parser(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer").add_subparsers(
        dest="tokenizer_command", required=True, metavar="ACTION"
    )
    train = tok.add_parser("train", help="train on text files (txt, jsonl, parquet; .gz/.zst/.xz)")
    train.add_argument("--input", nargs="+", required=True, help="files or globs")
    train.add_argument("--vocab-size", type=int, default=80000)
    train.add_argument("--out", type=Path, required=True)
    train.set_defaults(func=run_tokenizer_train)

    data = sub.add_parser("data", help="prepare token shards").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    prep = data.add_parser(
        "prepare", help="raw text per domain -> token shards + manifest (see docs/data.md)"
    )
    prep.add_argument("--config", type=Path, required=True, help="data TOML: tokenizer, out, [[domains]]")
    prep.add_argument("--decontaminate", nargs="+", default=[], metavar="TESTSET", help="test files or globs")
    prep.add_argument("--ngram", type=int, default=13, help="n-gram length (tokens) for decontamination")
    prep.add_argument("--decontaminate-action", choices=["remove", "report"], default="remove")
    prep.set_defaults(func=run_prepare)


def run_tokenizer_train(args) -> int:
    import glob

    from teleflm.data.tokenizer import train_tokenizer

    files = sorted(
        {p for pattern in args.input for p in glob.glob(pattern, recursive=True) if Path(p).is_file()}
    )
    if not files:
        raise FileNotFoundError(f"--input {args.input}: no files")
    out = train_tokenizer([Path(f) for f in files], args.vocab_size, args.out)
    print(f"tokenizer with {args.vocab_size} entries written to {out}")
    return 0


def run_prepare(args) -> int:
    from teleflm.data.prepare import prepare

    prepare(
        args.config,
        decontaminate=args.decontaminate,
        ngram=args.ngram,
        decontaminate_action=args.decontaminate_action,
    )
    return 0

"""`teleflm data prepare` (raw text -> token shards), `teleflm data inspect` (what a shards folder holds)
and `teleflm data verify` (every file's sha256 against the manifest)."""

from pathlib import Path


def add_parser(sub) -> None:
    actions = sub.add_parser("data", help="prepare and inspect token shards").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    prep = actions.add_parser(
        "prepare", help="raw text per domain -> token shards + manifest (see docs/data.md)"
    )
    prep.add_argument("--config", type=Path, required=True, help="data TOML: tokenizer, out, [[domains]]")
    prep.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the config's)")
    prep.add_argument("--out", type=Path, help="shards folder (default: the config's)")
    prep.add_argument(
        "--decontaminate", nargs="+", default=[], metavar="TESTSET", help="test-set files or globs"
    )
    prep.add_argument("--ngram", type=int, default=13, help="n-gram length in tokens for decontamination")
    prep.add_argument("--decontaminate-action", choices=["remove", "report"], default="remove")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.add_argument("--workers", type=int, default=0, help="encoding processes (default: one per core)")
    prep.set_defaults(func=run_prepare)

    inspect = actions.add_parser("inspect", help="print a shards folder's domains (file sizes checked)")
    verify = actions.add_parser("verify", help="hash every shard file against the manifest (reads all data)")
    for p, func in ((inspect, run_inspect), (verify, run_verify)):
        p.add_argument("shards", type=Path)
        p.add_argument("--tokenizer", type=Path, help="refuse shards made by another tokenizer")
        p.set_defaults(func=func)


def run_prepare(args) -> int:
    from teleflm.data.prepare import prepare

    prepare(
        args.config,
        tokenizer=args.tokenizer,
        out=args.out,
        decontaminate=args.decontaminate,
        ngram=args.ngram,
        decontaminate_action=args.decontaminate_action,
        progress=not args.quiet,
        workers=args.workers,
    )
    return 0


def _open(args):
    from teleflm.data.shards import open_shards
    from teleflm.data.tokenizer import tokenizer_hash

    expected = tokenizer_hash(args.tokenizer) if args.tokenizer else None
    return open_shards(args.shards, expected_tokenizer_hash=expected)


def run_verify(args) -> int:
    from teleflm.data.shards import verify_shards

    shards = _open(args)
    verify_shards(shards)
    print(f"{args.shards}: every file matches its sha256 in the manifest")
    return 0


def run_inspect(args) -> int:
    shards = _open(args)
    m = shards.manifest
    print(
        f"{args.shards}: tokenizer sha256 {m['tokenizer_hash']}, {m['dtype']}, vocabulary {m['vocab_size']}"
    )
    print(
        f"{'domain':16s} {'proportion':>10s} {'epochs':>6s} {'train docs':>11s} {'train tokens':>13s} {'val docs':>9s}"
    )
    for name in shards.domains:
        d, train, val = m["domains"][name], shards.split_info(name, "train"), shards.split_info(name, "val")
        print(
            f"{name:16s} {d['proportion']:10.4g} {d['epochs']:6.3g} {train['documents']:11,d} "
            f"{train['tokens']:13,d} {val['documents']:9,d}"
        )
    return 0

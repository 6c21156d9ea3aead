"""`teleflm tokenizer train`: a byte-level BPE with Tele-FLM's special tokens."""

from pathlib import Path


def add_parser(sub) -> None:
    actions = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer").add_subparsers(
        dest="tokenizer_command", required=True, metavar="ACTION"
    )
    train = actions.add_parser("train", help="train on text files (txt, jsonl, parquet; .gz/.zst/.xz)")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="files or globs")
    train.add_argument("--vocab-size", type=int, default=80000, help="entries, special tokens included")
    train.add_argument("--out", type=Path, required=True, help="folder for tokenizer.json and its config")
    train.set_defaults(func=run_train)


def run_train(args) -> int:
    from teleflm.data.tokenizer import expand_files, raw_tokenizer, tokenizer_hash, train_tokenizer

    files = expand_files(args.input)
    out = train_tokenizer(files, args.vocab_size, args.out)
    size = raw_tokenizer(out).get_vocab_size()
    print(f"tokenizer of {size} entries from {len(files)} file(s) written to {out}")
    print(f"sha256 of tokenizer.json: {tokenizer_hash(out)}")
    return 0

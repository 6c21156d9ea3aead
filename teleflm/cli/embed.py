"""`teleflm embed --model PATH --input FILE.jsonl --out FILE.npy|FILE.jsonl`: text embeddings."""

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed the texts of a JSONL file (pooled final hidden states)")
    p.add_argument("--model", required=True, metavar="PATH", help="export, official layout or checkpoint")
    p.add_argument(
        "--input", required=True, metavar="FILE", help="JSONL: objects with a text field, or strings"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=".npy (float32 matrix, row i = i-th text) or .jsonl ({index, embedding} per line)",
    )
    p.add_argument("--text-field", default="text", help="the field holding the text (default: text)")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean")
    p.add_argument("--normalize", action="store_true", help="L2-normalise each vector")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPUs, fp32 on CPUs")
    p.set_defaults(func=run)


def run(args) -> int:
    from teleflm.serve.embed import embed, read_texts, write_embeddings
    from teleflm.train.checkpoint import load_any_model

    if Path(args.out).suffix not in (".npy", ".jsonl"):
        raise ValueError(f"{args.out}: the output must end in .npy or .jsonl")
    texts = read_texts(args.input, args.text_field)  # a bad line fails before the model loads
    model, tokenizer, _ = load_any_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer in the model folder")
    vectors, _ = embed(model, tokenizer, texts, args.pooling, args.normalize, args.batch_size, progress=True)
    write_embeddings(vectors, args.out)
    print(f"{len(texts)} embeddings of size {vectors.shape[1]} -> {args.out}")
    return 0

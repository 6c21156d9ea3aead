"""`teleflm generate --model PATH --prompt TEXT`: stream a continuation to the terminal."""


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a model folder, streaming tokens")
    p.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="a model folder: export, official layout or training checkpoint",
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (default: the model folder's)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.03, help="default: the model card's 1.03")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPUs, fp32 on CPUs")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from teleflm.cli.common import load_model_any
    from teleflm.model.io import check_tokenizer_fits, load_tokenizer, real_vocab_size

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    model, tokenizer, _ = load_model_any(args.model, dtype=args.dtype)  # cuda when available, else cpu
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        check_tokenizer_fits(tokenizer, model.config, args.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer in the model folder (pass --tokenizer DIR)")

    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    # Rows past the tokenizer are embedding padding: never emit them.
    padded_ids = list(range(real_vocab_size(tokenizer), model.config.vocab_size))
    model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        suppress_tokens=padded_ids or None,
        streamer=TextStreamer(tokenizer, skip_special_tokens=True),
        **(sampling if args.temperature > 0 else {"do_sample": False}),
    )
    return 0

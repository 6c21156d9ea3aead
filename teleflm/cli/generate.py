"""`teleflm generate --model PATH --prompt TEXT`: stream a continuation to the terminal."""

from teleflm.cli.common import add_sampling_arguments


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
    add_sampling_arguments(p, max_new_tokens=128)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from teleflm.cli.common import check_sampling_arguments, note_context_limit
    from teleflm.data.tokenizer import load_tokenizer, padded_ids
    from teleflm.model.io import check_tokenizer_fits, new_token_budget
    from teleflm.train.checkpoint import load_any_model

    check_sampling_arguments(args)
    model, tokenizer, _ = load_any_model(args.model, dtype=args.dtype)  # cuda when available, else cpu
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        check_tokenizer_fits(tokenizer, model.config, args.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer in the model folder (pass --tokenizer DIR)")

    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    context = model.config.max_position_embeddings
    budget = new_token_budget(inputs["input_ids"].shape[1], args.max_new_tokens, context)
    note_context_limit(args.max_new_tokens, budget, context)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    # Rows past the tokenizer are embedding padding: never emit them.
    model.generate(
        **inputs,
        max_new_tokens=budget,
        repetition_penalty=args.repetition_penalty,
        suppress_tokens=padded_ids(tokenizer, model.config.vocab_size) or None,
        streamer=TextStreamer(tokenizer, skip_special_tokens=True),
        **(sampling if args.temperature > 0 else {"do_sample": False}),
    )
    return 0

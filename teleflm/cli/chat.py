"""`teleflm chat --model PATH`: chat in the terminal, answers streamed, history kept; `--prompt`
answers one message and prints only the answer (for scripts)."""

import sys

from teleflm.cli.common import add_sampling_arguments

HELP = "Type a message; /reset forgets the conversation, /exit (or Ctrl-D) quits."


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with an instruct model in the terminal (streaming, with history)")
    p.add_argument(
        "--model", required=True, metavar="PATH", help="an export, official layout or training checkpoint"
    )
    p.add_argument("--prompt", help="answer this one message, print only the answer, and exit")
    p.add_argument("--system", default="", help="system message opening the conversation")
    add_sampling_arguments(p, max_new_tokens=256)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from teleflm.cli.common import check_sampling_arguments, note_context_limit
    from teleflm.sft.chat import ChatSession
    from teleflm.train.checkpoint import load_any_model

    check_sampling_arguments(args)
    model, tokenizer, _ = load_any_model(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer in the model folder")
    torch.manual_seed(args.seed)
    context = model.config.max_position_embeddings
    note_context_limit(args.max_new_tokens, min(args.max_new_tokens, context - 1), context)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.prompt is not None:
        session.reply(args.prompt, streamer)  # the streamer prints the answer and a newline
        return 0
    print(HELP, file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if text.strip() == "/exit":
            return 0
        if text.strip() == "/reset":
            session.reset()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        print("bot> ", end="", flush=True)
        session.reply(text, streamer)

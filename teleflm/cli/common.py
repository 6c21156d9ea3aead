"""What several commands share: the sampling options of the commands that generate, and running a
training job."""

import sys


def add_sampling_arguments(p, max_new_tokens: int) -> None:
    """The sampling options `generate` and `chat` share, with the model card's defaults."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.03, help="default: the model card's 1.03")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on GPUs, fp32 on CPUs")


def check_sampling_arguments(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")


def note_context_limit(max_new_tokens: int, budget: int, context: int) -> None:
    """Tell the user, on stderr, that --max-new-tokens is more than the model's context leaves."""
    if budget < max_new_tokens:
        print(
            f"note: --max-new-tokens {max_new_tokens} does not fit the model's context of {context} "
            f"tokens (prompt included): at most {budget} new tokens",
            file=sys.stderr,
        )


def add_override_argument(p, example: str) -> None:
    """`--set section.key=value` (repeatable; values in TOML syntax), applied over the config file."""
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override a config value (TOML syntax), e.g. --set {example}",
    )


def run_training(train, cfg) -> int:
    """Run `train(cfg)` (pre-training, SFT, DPO), leave the process group whatever happens, and
    print the final figures."""
    from teleflm.train.trainer import close

    try:
        result = train(cfg)
    finally:
        close()
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0

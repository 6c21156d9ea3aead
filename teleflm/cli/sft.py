"""`teleflm sft --config C [--set section.key=value ...]`: fine-tune on chat data (docs/sft.md)."""

from teleflm.cli.common import add_override_argument, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat JSONL, loss on assistant tokens only")
    p.add_argument("--config", required=True, help="TOML file with an [sft] table (see configs/sft/)")
    add_override_argument(p, "sft.epochs=2")
    p.set_defaults(func=run)


def run(args) -> int:
    from teleflm.sft.config import load_sft_config
    from teleflm.sft.run import run_sft

    return run_training(run_sft, load_sft_config(args.config, args.overrides))

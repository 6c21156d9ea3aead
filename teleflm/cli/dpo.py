"""`teleflm dpo --config C [--set section.key=value ...]`: preference tuning (DPO) on chosen/rejected
pairs (docs/sft.md)."""

from teleflm.cli.common import add_override_argument, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("dpo", help="Direct Preference Optimization on (prompt, chosen, rejected) JSONL")
    p.add_argument("--config", required=True, help="TOML file with a [dpo] table (see configs/sft/)")
    add_override_argument(p, "dpo.beta=0.2")
    p.set_defaults(func=run)


def run(args) -> int:
    from teleflm.sft.config import load_sft_config
    from teleflm.sft.dpo import run_dpo

    return run_training(run_dpo, load_sft_config(args.config, args.overrides, table="dpo"))

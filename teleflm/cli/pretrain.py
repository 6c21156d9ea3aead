"""`teleflm pretrain --config C [--set section.key=value ...]`: one process or many under torchrun."""

from teleflm.cli.common import add_override_argument, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train (or resume) a Tele-FLM model from a TOML config")
    p.add_argument("--config", required=True, help="TOML file (see configs/ and docs/config.md)")
    add_override_argument(p, "parallel.tp=2")
    p.set_defaults(func=run)


def run(args) -> int:
    from teleflm.train import stages
    from teleflm.train.config import load_config

    return run_training(stages.run, load_config(args.config, args.overrides))

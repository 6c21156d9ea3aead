"""`teleflm pretrain --config C [--set section.key=value ...]`: one process or many under torchrun."""

from teleflm.cli.common import add_override_argument


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pre-train (or resume) a Tele-FLM model from a TOML config")
    p.add_argument("--config", required=True, help="TOML file (see configs/ and docs/config.md)")
    add_override_argument(p, "parallel.tp=2")
    p.set_defaults(func=run)


def run(args) -> int:
    from teleflm.train import stages
    from teleflm.train.config import load_config
    from teleflm.train.trainer import close

    cfg = load_config(args.config, args.overrides)
    try:
        result = stages.run(cfg)
    finally:
        close()
    print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0

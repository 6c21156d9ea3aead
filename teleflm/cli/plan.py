"""`teleflm plan --config C --gpus N --gpu-type T [--tokens T] [--price-per-gpu-hour P] [--mfu M]`."""

from teleflm.cli.common import add_override_argument


def add_parser(sub) -> None:
    from teleflm.parallel.plan import DEVICES

    p = sub.add_parser("plan", help="memory, time and cost of a run before renting the GPUs")
    p.add_argument("--config", required=True, help="a pre-training TOML config (its [parallel] layout)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-type", required=True, choices=sorted(DEVICES))
    p.add_argument("--tokens", type=float, help="training tokens (default: schedule.total_tokens)")
    p.add_argument("--price-per-gpu-hour", type=float)
    p.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation (default 0.5)")
    add_override_argument(p, "parallel.tp=8")
    p.set_defaults(func=run)


def run(args) -> int:
    from teleflm.parallel.plan import format_plan, plan
    from teleflm.train.config import load_config

    cfg = load_config(args.config, ["data.shards=''", "data.tokenizer=''", *args.overrides])
    result = plan(cfg, args.gpus, args.gpu_type, args.tokens, args.price_per_gpu_hour, args.mfu)
    print(format_plan(result, args.gpus, args.gpu_type))
    return 0

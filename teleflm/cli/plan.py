"""`teleflm plan --config C --gpus N --gpu-type T [--tokens T] [--price-per-gpu-hour P] [--mfu M]`, and
`teleflm plan --simulate --config C --gpus N [--ranks R ...]`: the layout through the real code at
its full world size, on this CPU (fake process group, meta tensors)."""

from teleflm.cli.common import add_override_argument


def add_parser(sub) -> None:
    from teleflm.plan.estimate import DEVICES

    p = sub.add_parser("plan", help="memory, time and cost of a run before renting the GPUs")
    p.add_argument("--config", required=True, help="a pre-training TOML config (its [parallel] layout)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-type", choices=sorted(DEVICES), help="required without --simulate")
    p.add_argument("--tokens", type=float, help="training tokens (default: schedule.total_tokens)")
    p.add_argument("--price-per-gpu-hour", type=float)
    p.add_argument("--mfu", type=float, default=0.5, help="assumed model FLOPs utilisation (default 0.5)")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="shard the model as training would for some ranks of a world of --gpus (fake process group, "
        "meta tensors): each rank's bytes beside the planner's, and each growth's per-rank peak",
    )
    p.add_argument(
        "--ranks", type=int, nargs="+", help="ranks to simulate (default: first, a middle one, last)"
    )
    add_override_argument(p, "parallel.tp=8")
    p.set_defaults(func=run)


def run(args) -> int:
    from teleflm.plan.estimate import format_plan, plan
    from teleflm.train.config import load_config

    cfg = load_config(args.config, ["data.shards=''", "data.tokenizer=''", *args.overrides])
    if args.gpu_type is None and not args.simulate:
        raise ValueError("--gpu-type is needed (or --simulate)")
    if args.gpu_type is not None:
        result = plan(cfg, args.gpus, args.gpu_type, args.tokens, args.price_per_gpu_hour, args.mfu)
        print(format_plan(result, args.gpus, args.gpu_type))
    if args.simulate:
        from teleflm.plan.simulate import format_simulation, simulate

        bad = [r for r in args.ranks or [] if not 0 <= r < args.gpus]
        if bad:
            raise ValueError(f"--ranks {bad} are not ranks of a world of {args.gpus}")
        print(format_simulation(simulate(cfg, args.gpus, args.ranks), args.gpus))
    return 0

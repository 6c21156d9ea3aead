"""`teleflm predict --ladder ladder.toml --target CONFIG`: forecast a big model's loss from a ladder of
small muP widths (muScaling)."""

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="forecast a target's loss from a ladder of muP widths (muScaling)")
    p.add_argument("--ladder", required=True, help="ladder TOML (see docs/mup.md)")
    p.add_argument("--target", required=True, help="the target model's training TOML")
    p.add_argument("--report", help="report folder (default: the ladder's out)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from teleflm.config import read_toml
    from teleflm.scaling.ladder import (
        describe,
        forecast,
        load_ladder,
        metric_name,
        run_ladder,
        target_params,
        write_report,
    )
    from teleflm.tune.runs import training_flops

    torch.set_num_threads(1)  # ladder rungs are tiny: one thread beats two contended ones
    spec = load_ladder(args.ladder)
    target = read_toml(args.target)
    n_target = target_params(target, spec.non_embedding)
    if spec.widths and target["model"].get("num_hidden_layers") != spec.base["model"].get(
        "num_hidden_layers"
    ):
        print("warning: the target's depth differs from the ladder's; muScaling varies width only")
    rungs = run_ladder(spec)
    flops = training_flops(target) if "total_tokens" in target.get("schedule", {}) else None
    result = forecast(rungs, n_target, Path(args.target).stem, metric_name(spec), flops)
    what = "non-embedding" if spec.non_embedding else "total"
    report = write_report(result, Path(args.report) if args.report else spec.out, args.ladder, what)
    print(describe(result))
    print(f"report: {report}")
    return 0

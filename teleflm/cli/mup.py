"""`teleflm mup coord-check | search | transfer`: prove muP is wired right, search hyper-parameters on a
proxy, and carry the best set to a wider model."""

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("mup", help="muP: coordinate check, hyper-parameter search, transfer")
    commands = p.add_subparsers(dest="mup_command", required=True, metavar="MUP_COMMAND")

    c = commands.add_parser(
        "coord-check", help="activation sizes vs width (muP, SP) and depth (CompleteP, width-only muP)"
    )
    c.add_argument("--config", required=True, help="training TOML: model shape and [mup] values")
    c.add_argument("--widths", default="64,128,256,512", help="comma-separated widths (default: %(default)s)")
    c.add_argument("--depths", help="comma-separated depths: also check over depth (e.g. 2,4,8,16)")
    c.add_argument("--steps", type=int, default=10, help="training steps per width (default: %(default)s)")
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--seq-len", type=int, default=32)
    c.add_argument("--tolerance", type=float, default=0.25, help="|slope| under which a size is flat")
    c.add_argument("--out", default="runs/mup/coord-check", help="report folder (default: %(default)s)")
    c.set_defaults(func=run_coord_check)

    s = commands.add_parser("search", help="grid / random / tpe search on a muP proxy, any number of workers")
    s.add_argument("--config", required=True, help="the proxy's training TOML")
    s.add_argument("--space", required=True, help="search space TOML (see docs/mup.md)")
    s.add_argument("--out", default="runs/mup/search", help="trials table, best set, report")
    s.add_argument(
        "--sequences", help="train on packed token sequences (.npy, n x (context+1)) instead of the shards"
    )
    s.add_argument("--parallel", type=int, help="worker processes here (overrides the space's `parallel`)")
    s.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna RDB storage every worker reaches (default: sqlite <out>/study.db)",
    )
    s.add_argument("--study", default="teleflm-search", help="the study's name in the storage")
    s.add_argument(
        "--heartbeat", type=int, default=60, metavar="S", help="seconds between a running trial's heartbeats"
    )
    s.set_defaults(func=run_search)

    t = commands.add_parser("transfer", help="write a wider config with the searched values")
    t.add_argument("--best", required=True, help="best.toml written by `teleflm mup search`")
    t.add_argument("--to", required=True, dest="target", help="the target model's training TOML")
    t.add_argument("--out", help="where to write the new config (default: <target>-mup.toml)")
    t.set_defaults(func=run_transfer)


def run_coord_check(args) -> int:
    import torch

    from teleflm.config import read_toml
    from teleflm.tune.coord_check import check_values, coord_check, passes, slope_table, write_report

    axes = {}
    for axis, text in (("width", args.widths), ("depth", args.depths)):
        try:
            axes[axis] = [int(v) for v in text.split(",")] if text is not None else None
        except ValueError:
            raise ValueError(f"--{axis}s: expected comma-separated integers, got {text!r}") from None
        if text is not None:
            check_values(axis, axes[axis])
    torch.set_num_threads(1)  # tiny matmuls: one thread beats two contended ones
    raw = read_toml(args.config)
    results = [
        coord_check(raw, values, args.steps, args.batch_size, args.seq_len, axis=axis)
        for axis, values in axes.items()
        if values is not None
    ]
    report = write_report(results, Path(args.out), args.tolerance, args.config)
    ok = True
    for result in results:
        print(slope_table(result))
        ok &= passes(result, args.tolerance)
    verdict = "muP flat over width, SP logits growing" + (
        "; CompleteP flat over depth, width-only muP's residual growing" if args.depths else ""
    )
    print(f"verdict: {verdict if ok else 'FAILED (see the report)'}; report: {report}")
    return 0 if ok else 1


def run_search(args) -> int:
    from teleflm.config import read_toml
    from teleflm.tune.report import write_results
    from teleflm.tune.search import load_space, search

    raw = read_toml(args.config)
    space = load_space(args.space)
    if args.parallel is not None:
        if args.parallel < 1:
            raise ValueError(f"--parallel must be at least 1, got {args.parallel}")
        space.parallel = args.parallel
    if args.heartbeat < 1:
        raise ValueError(f"--heartbeat must be at least 1 second, got {args.heartbeat}")
    records = search(raw, space, args.out, args.sequences, args.storage, args.study, args.heartbeat)
    best = write_results(raw, records, Path(args.out), args.config)
    print(f"best: objective {best['objective']:.4f} {best['mup']} {best['model']}")
    print(f"wrote {Path(args.out) / 'best.toml'} and {Path(args.out) / 'search.md'}")
    return 0


def run_transfer(args) -> int:
    from teleflm.config import read_toml
    from teleflm.train.config import config_from
    from teleflm.tune.runs import to_toml
    from teleflm.tune.transfer import transfer, transfer_report

    best = read_toml(args.best)
    target = read_toml(args.target)
    out_raw = transfer(best, target)
    config_from(out_raw, args.target)  # the written config must load
    out = Path(args.out) if args.out else Path(args.target).with_name(Path(args.target).stem + "-mup.toml")
    header = (
        f"# {args.target} with the muP hyper-parameters of {args.best} (proxy width "
        f"{best['proxy_width']:g}, mup_scale_factor {out_raw['model']['mup_scale_factor']:g})\n"
    )
    out.write_text(header + to_toml(out_raw))
    report = transfer_report(best, out_raw, out.with_suffix(".md"))
    print(f"wrote {out}: mup {out_raw['mup']}, mup_scale_factor {out_raw['model']['mup_scale_factor']:g}")
    print(f"report: {report} and {report.with_suffix('.png')}")
    return 0

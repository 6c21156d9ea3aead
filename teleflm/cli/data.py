"""`teleflm data prepare` (raw text -> token shards, here or on a cluster), `teleflm data worker` (one
worker of a prepare job), `teleflm data progress`, `teleflm data inspect` (what a shards folder holds)
and `teleflm data verify` (every file's sha256 against the manifest)."""

from pathlib import Path


def add_parser(sub) -> None:
    from teleflm.data.decontaminate import DEFAULT_NGRAM, MIN_ITEM_TOKENS  # numpy only: no torch

    actions = sub.add_parser("data", help="prepare and inspect token shards").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    prep = actions.add_parser(
        "prepare", help="raw text per domain -> token shards + manifest (see docs/data.md)"
    )
    prep.add_argument("--config", type=Path, required=True, help="data TOML: tokenizer, out, [[domains]]")
    prep.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the config's)")
    prep.add_argument("--out", type=Path, help="shards folder (default: the config's)")
    prep.add_argument(
        "--decontaminate", nargs="+", default=[], metavar="TESTSET", help="test-set files or globs"
    )
    prep.add_argument(
        "--decontaminate-tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help="lm-evaluation-harness tasks (local definitions, as `teleflm eval harness` names them)",
    )
    prep.add_argument("--include", nargs="+", default=[], help="more task folders for --decontaminate-tasks")
    prep.add_argument(
        "--ngram", type=int, default=DEFAULT_NGRAM, help="n-gram length in tokens for decontamination"
    )
    prep.add_argument(
        "--min-item-tokens",
        type=int,
        default=MIN_ITEM_TOKENS,
        help="test items shorter than --ngram but at least this long are matched whole; shorter ones are skipped",
    )
    prep.add_argument("--decontaminate-action", choices=["remove", "report"], default="remove")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.add_argument(
        "--workers", type=int, default=0, help="encoding threads per job worker (default: its cores)"
    )
    prep.add_argument("--jobs", type=int, default=1, help="job workers: local processes or Slurm array tasks")
    prep.add_argument("--engine", choices=["local", "slurm"], default="local")
    prep.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="an sbatch option for every stage, e.g. --slurm-option=--partition=cpu (repeatable)",
    )
    prep.add_argument(
        "--dry-run", action="store_true", help="with --engine slurm: write the sbatch scripts, submit nothing"
    )
    prep.set_defaults(func=run_prepare)

    worker = actions.add_parser("worker", help="run one worker of a prepare job (what the engines run)")
    worker.add_argument("--job", type=Path, required=True, help="the job folder: SHARDS/.job")
    worker.add_argument("--stage", required=True, choices=["scan", "dedup", "encode", "merge"])
    worker.add_argument("--worker", type=int, required=True, help="0 .. jobs - 1 (ignored by merge)")
    worker.add_argument("--workers", type=int, default=0, help="encoding threads (default: one per core)")
    worker.set_defaults(func=run_job_worker)

    progress = actions.add_parser("progress", help="a prepare job's progress over all its workers")
    progress.add_argument("shards", type=Path)
    progress.set_defaults(func=run_progress)

    inspect = actions.add_parser("inspect", help="print a shards folder's domains (file sizes checked)")
    verify = actions.add_parser("verify", help="hash every shard file against the manifest (reads all data)")
    for p, func in ((inspect, run_inspect), (verify, run_verify)):
        p.add_argument("shards", type=Path)
        p.add_argument("--tokenizer", type=Path, help="refuse shards made by another tokenizer")
        p.set_defaults(func=func)


def run_prepare(args) -> int:
    from teleflm.data.prepare import plan_job, prepare

    test_items = None
    if args.decontaminate_tasks:
        from teleflm.eval.harness import task_items

        test_items = task_items(args.decontaminate_tasks, args.include)
    decontamination = dict(
        decontaminate=args.decontaminate,
        test_items=test_items,
        ngram=args.ngram,
        min_item_tokens=args.min_item_tokens,
        decontaminate_action=args.decontaminate_action,
    )
    if args.engine == "local":
        prepare(
            args.config,
            tokenizer=args.tokenizer,
            out=args.out,
            progress=not args.quiet,
            workers=args.workers,
            jobs=args.jobs,
            **decontamination,
        )
        return 0
    from teleflm.data.cluster import submit_slurm

    job = plan_job(args.config, args.tokenizer, args.out, jobs=args.jobs, engine="slurm", **decontamination)
    submitted = submit_slurm(job, args.workers, args.slurm_option, submit=not args.dry_run)
    if args.dry_run:
        print("sbatch scripts, to submit in order (each after the last succeeded):\n" + "\n".join(submitted))
    else:
        print(f"submitted Slurm jobs {', '.join(submitted)} (stages then merge)")
    print(f"progress: teleflm data progress {job.parent}")
    return 0


def run_job_worker(args) -> int:
    from teleflm.data.prepare import merge, run_worker

    if args.stage == "merge":
        merge(args.job)
    else:
        run_worker(args.job, args.stage, args.worker, args.workers)
    return 0


def run_progress(args) -> int:
    from teleflm.data.cluster import describe_progress

    print(describe_progress(args.shards))
    return 0


def _open(args):
    from teleflm.data.shards import open_shards
    from teleflm.data.tokenizer import tokenizer_hash

    expected = tokenizer_hash(args.tokenizer) if args.tokenizer else None
    return open_shards(args.shards, expected_tokenizer_hash=expected)


def run_verify(args) -> int:
    from teleflm.data.shards import verify_shards

    shards = _open(args)
    verify_shards(shards)
    print(f"{args.shards}: every file matches its sha256 in the manifest")
    return 0


def run_inspect(args) -> int:
    shards = _open(args)
    m = shards.manifest
    print(
        f"{args.shards}: tokenizer sha256 {m['tokenizer_hash']}, {m['dtype']}, vocabulary {m['vocab_size']}"
    )
    print(
        f"{'domain':16s} {'proportion':>10s} {'epochs':>6s} {'train docs':>11s} {'train tokens':>13s} {'val docs':>9s}"
    )
    for name in shards.domains:
        d, train, val = m["domains"][name], shards.split_info(name, "train"), shards.split_info(name, "val")
        print(
            f"{name:16s} {d['proportion']:10.4g} {d['epochs']:6.3g} {train['documents']:11,d} "
            f"{train['tokens']:13,d} {val['documents']:9,d}"
        )
    return 0

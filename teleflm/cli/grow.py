"""`teleflm grow --from CKPT --to CONFIG [--ramp-steps N]`: grow a training checkpoint (MSG) into a new
one that `teleflm pretrain --config CONFIG` resumes from; in one process, or sharded over the ranks of
`torchrun --nproc-per-node N -m teleflm.cli.main grow ...`."""

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "grow", help="grow a training checkpoint to a larger shape (masked structural growth, docs/grow.md)"
    )
    p.add_argument("--from", dest="source", required=True, help="training checkpoint (a step-N folder)")
    p.add_argument(
        "--to",
        dest="config",
        required=True,
        help="pretrain TOML of the grown run: its [model] is the target shape, its [mup] the new weights' init",
    )
    p.add_argument("--ramp-steps", type=int, default=100, help="steps over which the masks ramp 0 -> 1")
    p.add_argument(
        "--layers-at",
        type=int,
        nargs="*",
        default=[],
        help="grown-model positions of the new layers (default: spread evenly)",
    )
    p.add_argument("--layer-init", choices=["copy", "interpolate", "stack"], default="copy")
    p.add_argument(
        "--out", help="where to write the grown checkpoint (default: <config out>/checkpoints/<CKPT>-grown)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import torch.distributed as dist

    from teleflm.parallel.mesh import init_distributed
    from teleflm.train.config import load_config
    from teleflm.train.growth import grow_checkpoint, plan_for_checkpoint

    cfg = load_config(args.config)
    init_distributed(cfg.parallel.timeout_s)
    source = Path(args.source)
    target = Path(args.out) if args.out else Path(cfg.out) / "checkpoints" / f"{source.name}-grown"
    # Validate before anything is written (grow_checkpoint checks again, with the tensors).
    new_config, plan = plan_for_checkpoint(source, cfg.model, args.layers_at, args.layer_init)
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or choose another --out")
    grow_checkpoint(source, target, cfg, args.ramp_steps, args.layers_at, args.layer_init, seed=cfg.seed)
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    print(
        f"grew {source} -> {target}: hidden {plan.old_hidden}->{plan.new_hidden}, "
        f"ffn {plan.old_ffn}->{plan.new_ffn}, heads {plan.old_heads}->{plan.new_heads} "
        f"(kv {plan.old_kv_heads}->{plan.new_kv_heads}), layers {plan.old_layers}->{plan.new_layers} "
        f"(new at {plan.new_layer_positions}), mup_scale_factor {new_config.mup_scale_factor:g}, "
        f"ramp {args.ramp_steps} steps"
    )
    return 0

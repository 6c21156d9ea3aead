"""`teleflm recipe [--config RECIPE.toml] [--out DIR]`: search on a proxy, transfer to a wider and
deeper target, forecast its loss from a ladder, train it, and report the forecast beside the
measured loss (teleflm.scaling.recipe), on the embedded sample."""

from importlib.resources import files
from pathlib import Path

RECIPE = files("teleflm.cli") / "recipe.toml"


def add_parser(sub) -> None:
    p = sub.add_parser("recipe", help="proxy search -> transfer -> ladder -> forecast -> target, checked")
    p.add_argument(
        "--config", default=str(RECIPE), help="recipe TOML (default: the shipped one, ~10 min on 2 cores)"
    )
    p.add_argument("--out", type=Path, help="output folder (default: the recipe's `out`)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from teleflm.scaling.recipe import load_recipe, run_recipe

    torch.set_num_threads(1)  # tiny models: one thread beats two contended ones
    spec = load_recipe(args.config)
    out = args.out or Path(spec.out)
    figures = run_recipe(spec, out)
    print(
        f"forecast {figures['forecast']:.4f}, measured {figures['measured']:.4f}: error {figures['error']:+.2%}; "
        f"report: {out / 'report.md'}"
    )
    return 0

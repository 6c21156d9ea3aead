"""The search's report: the best set (`best.toml`), every trial (`trials.csv`), a ranked table
(`search.md`) and the objective against each searched value (`search.png`)."""

import math
from pathlib import Path

from teleflm.tune.runs import SEARCHED, base_depth, base_width, hyperparams_of, to_toml


def best_record(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok" and math.isfinite(r["objective"])]
    if not ok:
        raise ValueError("no trial finished with a finite objective (every one diverged?)")
    return min(ok, key=lambda r: r["objective"])


def best_config(raw: dict, record: dict) -> dict:
    """The best set as TOML tables: [mup] and [model] values and the proxy width and depth they were
    found at."""
    values = {**hyperparams_of(raw), **record["values"]}
    use_mup = raw["model"].get("use_mup")
    return {
        "proxy_width": base_width(raw) if use_mup else raw["model"]["hidden_size"],
        "proxy_depth": base_depth(raw) if use_mup else raw["model"]["num_hidden_layers"],
        "use_mup": bool(raw["model"].get("use_mup", False)),
        "objective": record["objective"],
        "trial": record["trial"],
        "mup": {n: values[n] for n, table in SEARCHED.items() if table == "mup"},
        "model": {n: values[n] for n, table in SEARCHED.items() if table == "model"},
    }


def write_results(raw: dict, records: list[dict], out: Path, config_path: str) -> dict:
    """best.toml, trials.csv, search.md and search.png in `out`; returns the best set."""
    best = best_config(raw, best_record(records))
    (out / "best.toml").write_text(
        f"# Best of {len(records)} trials on {config_path} (teleflm mup search)\n" + to_toml(best)
    )
    write_csv(records, out / "trials.csv")
    searched = [n for n in SEARCHED if len({r["values"].get(n) for r in records}) > 1]
    _plot(records, searched, out / "search.png")
    lines = [
        "# muP hyper-parameter search",
        "",
        f"Proxy `{config_path}` (width {best['proxy_width']:g}), {len(records)} trials, objective: held-out "
        "loss (lower is better). Full table: `trials.csv`.",
        "",
        "| rank | " + " | ".join(searched) + " | objective | status |",
        "|---" * (len(searched) + 3) + "|",
    ]
    ranked = sorted(records, key=lambda r: (r["status"] != "ok", r["objective"]))
    for k, r in enumerate(ranked[:20], 1):
        cells = " | ".join(f"{r['values'][n]:.3g}" for n in searched)
        lines.append(f"| {k} | {cells} | {r['objective']:.4f} | {r['status']} |")
    lines += [
        "",
        "Best set (`best.toml`):",
        "",
        "```toml",
        to_toml(best).strip(),
        "```",
        "",
        "![search](search.png)",
        "",
    ]
    (out / "search.md").write_text("\n".join(lines))
    return best


def _plot(records: list[dict], searched: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    names = searched or ["lr"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    for ax, n in zip(axes[0], names, strict=True):
        ax.scatter([r["values"].get(n, math.nan) for r in ok], [r["objective"] for r in ok], s=12)
        ax.set_xscale("log")
        ax.set_xlabel(n)
        ax.set_ylabel("objective")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_csv(records: list[dict], path: Path) -> None:
    names = list(SEARCHED)
    lines = [",".join(["trial", *names, "objective", "loss", "status", "seconds"])]
    for r in sorted(records, key=lambda r: r["trial"]):
        values = [repr(r["values"].get(n, "")) for n in names]
        lines.append(
            ",".join(map(str, [r["trial"], *values, r["objective"], r["loss"], r["status"], r["seconds"]]))
        )
    path.write_text("\n".join(lines) + "\n")

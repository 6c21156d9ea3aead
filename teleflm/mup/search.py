"""Hyper-parameter search on a muP proxy, and transfer of the best set to a wider model.

A search space (TOML) names some of the card's seven hyper-parameters with a grid of values or a
range; the others keep the config's values or are derived from searched ones:

    method = "grid"        # grid | random | optuna (optuna only if installed)
    trials = 16            # random / optuna: how many
    seed = 0
    parallel = 2           # trials run at once, each in its own process
    threads_per_trial = 1

    [params.lr]
    values = [1e-3, 3e-3, 1e-2]    # grid (random/optuna: picks among them)
    [params.std]
    low = 1e-3                     # a range: random / optuna only
    high = 1e-1
    log = true

    [derived]
    matrix_lr = "lr"               # a searched name, optionally times a number
    min_lr = "0.1 * lr"

Every finished trial is appended (one JSON line, flushed) to `<out>/trials.jsonl`, so a killed search
run again with the same --out skips what is done; `<out>/best.toml` holds the best set.
"""

import itertools
import json
import math
import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from teleflm.mup.runs import (
    SEARCHED,
    RunData,
    base_width,
    hyperparams_of,
    read_toml,
    scored_run,
    to_toml,
    with_hyperparams,
)

METHODS = ("grid", "random", "optuna")


@dataclass
class ParamRange:
    values: list[float] | None = None  # explicit choices
    low: float | None = None
    high: float | None = None
    log: bool = True


@dataclass
class SearchSpace:
    params: dict[str, ParamRange]
    derived: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (source, factor)
    method: str = "grid"
    trials: int = 16
    seed: int = 0
    parallel: int = 1
    threads_per_trial: int = 1


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _derived(name: str, expression: str, searched: set[str]) -> tuple[str, float]:
    factor, source = 1.0, expression.replace(" ", "")
    if "*" in source:
        left, right = source.split("*", 1)
        number, source = (right, left) if _is_number(right) else (left, right)
        if not _is_number(number):
            raise ValueError(f"[derived] {name} = {expression!r}: expected 'NAME' or 'NUMBER * NAME'")
        factor = float(number)
    if source not in searched:
        raise ValueError(f"[derived] {name} = {expression!r}: {source!r} is not a searched parameter")
    return source, factor


def load_space(path: str | Path) -> SearchSpace:
    raw = read_toml(path)
    where = str(path)
    known = {"method", "trials", "seed", "parallel", "threads_per_trial", "params", "derived"}
    if set(raw) - known:
        raise ValueError(f"{where}: unknown key(s) {sorted(set(raw) - known)}; known: {sorted(known)}")
    params = {}
    for name, spec in raw.get("params", {}).items():
        if name not in SEARCHED:
            raise ValueError(f"{where}: [params.{name}] is not one of the searched {sorted(SEARCHED)}")
        unknown = set(spec) - {"values", "low", "high", "log"}
        if unknown:
            raise ValueError(f"{where}: [params.{name}]: unknown key(s) {sorted(unknown)}")
        p = ParamRange(
            values=[float(v) for v in spec["values"]] if "values" in spec else None,
            low=spec.get("low"),
            high=spec.get("high"),
            log=spec.get("log", True),
        )
        if p.values is None and (p.low is None or p.high is None or not 0 < p.low < p.high):
            raise ValueError(f"{where}: [params.{name}] needs `values` or 0 < `low` < `high`")
        if p.values is not None and not p.values:
            raise ValueError(f"{where}: [params.{name}].values is empty")
        params[name] = p
    if not params:
        raise ValueError(f"{where}: no [params.NAME] table: nothing to search")
    derived = {}
    for name, expression in raw.get("derived", {}).items():
        if name not in SEARCHED or name in params:
            raise ValueError(
                f"{where}: [derived] {name}: must be a searched name that is not itself searched"
            )
        derived[name] = _derived(name, str(expression), set(params))
    space = SearchSpace(
        params,
        derived,
        **{k: raw[k] for k in ("method", "trials", "seed", "parallel", "threads_per_trial") if k in raw},
    )
    if space.method not in METHODS:
        raise ValueError(f"{where}: method must be one of {METHODS}, got {space.method!r}")
    if space.method == "grid" and any(p.values is None for p in params.values()):
        raise ValueError(f"{where}: grid search needs `values` for every parameter")
    if space.parallel < 1 or space.trials < 1:
        raise ValueError(f"{where}: parallel and trials must be >= 1")
    return space


def full_values(space: SearchSpace, sampled: dict) -> dict:
    """A trial's searched values plus the derived ones."""
    values = dict(sampled)
    for name, (source, factor) in space.derived.items():
        values[name] = sampled[source] * factor
    return values


def planned_trials(space: SearchSpace) -> list[dict]:
    """The searched values of every trial, in a fixed order (so trial i is the same on every resume)."""
    names = list(space.params)
    if space.method == "grid":
        grid = itertools.product(*(space.params[n].values for n in names))
        return [full_values(space, dict(zip(names, combo, strict=True))) for combo in grid]
    rng = random.Random(space.seed)
    trials = []
    for _ in range(space.trials):
        sampled = {}
        for n in names:
            p = space.params[n]
            if p.values is not None:
                sampled[n] = rng.choice(p.values)
            elif p.log:
                sampled[n] = math.exp(rng.uniform(math.log(p.low), math.log(p.high)))
            else:
                sampled[n] = rng.uniform(p.low, p.high)
        trials.append(full_values(space, sampled))
    return trials


# ----- the table of finished trials -----


def read_table(path: Path) -> list[dict]:
    """Finished trials. A last line cut off by a kill is dropped from the file, so appends stay valid."""
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line damaged some other way: its trial simply runs again
    return records


def append_record(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_csv(records: list[dict], path: Path) -> None:
    names = list(SEARCHED)
    lines = [",".join(["trial", *names, "objective", "loss", "status", "seconds"])]
    for r in sorted(records, key=lambda r: r["trial"]):
        values = [repr(r["values"].get(n, "")) for n in names]
        lines.append(
            ",".join(map(str, [r["trial"], *values, r["objective"], r["loss"], r["status"], r["seconds"]]))
        )
    path.write_text("\n".join(lines) + "\n")


# ----- running trials -----


def run_trial(raw: dict, trial: int, values: dict, out: str, data_path: str | None, threads: int) -> dict:
    """One trial in a worker process: train the proxy with `values` and score it."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = scored_run(
        with_hyperparams(raw, values), Path(out) / "trials" / f"{trial:04d}", RunData.from_file(data_path)
    )
    return {"trial": trial, "values": values, **result, "seconds": round(time.perf_counter() - start, 2)}


def _matching_records(records: list[dict], plan: list[dict]) -> dict[int, dict]:
    done = {}
    for r in records:
        i = r["trial"]
        if i < len(plan) and not _same(r["values"], plan[i]):
            raise ValueError(
                f"trials.jsonl: trial {i} was run with {r['values']}, but this space plans {plan[i]}: "
                "the table belongs to another search; use another --out"
            )
        done[i] = r
    return done


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


def search(
    raw: dict, space: SearchSpace, out: str | Path, data_path: str | None = None, log=print
) -> list[dict]:
    """Run (or resume) a search; returns every finished trial record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "trials.jsonl"
    records = read_table(table)
    if space.method == "optuna":
        return _optuna_search(raw, space, out, data_path, records, log)
    plan = planned_trials(space)
    done = _matching_records(records, plan)
    todo = [i for i in range(len(plan)) if i not in done]
    log(f"search: {len(plan)} trials planned, {len(done)} already in {table}, {len(todo)} to run")
    with ProcessPoolExecutor(space.parallel, mp_context=get_context("spawn")) as pool:
        futures = {
            pool.submit(run_trial, raw, i, plan[i], str(out), data_path, space.threads_per_trial)
            for i in todo
        }
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                record = f.result()
                append_record(table, record)
                done[record["trial"]] = record
                log(
                    f"trial {record['trial']}: {record['status']} objective {record['objective']:.4f} {record['values']}"
                )
    return [done[i] for i in sorted(done)]


def _optuna_search(raw, space, out, data_path, records, log) -> list[dict]:
    try:
        import optuna
    except ImportError:
        raise ValueError(
            "method = 'optuna' needs optuna: pip install optuna (or use grid / random)"
        ) from None
    dists = {
        n: optuna.distributions.CategoricalDistribution(p.values)
        if p.values is not None
        else optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
        for n, p in space.params.items()
    }
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=space.seed))
    for r in records:  # resume: the table's trials teach the sampler
        if r["status"] == "ok":
            params = {n: r["values"][n] for n in dists}
            study.add_trial(
                optuna.trial.create_trial(params=params, distributions=dists, value=r["objective"])
            )
    done = list(records)
    log(f"search: optuna, {len(done)} of {space.trials} trials already in {out / 'trials.jsonl'}")
    with ProcessPoolExecutor(space.parallel, mp_context=get_context("spawn")) as pool:
        while len(done) < space.trials:
            batch = [study.ask(dists) for _ in range(min(space.parallel, space.trials - len(done)))]
            futures = [
                pool.submit(
                    run_trial,
                    raw,
                    len(done) + k,
                    full_values(space, t.params),
                    str(out),
                    data_path,
                    space.threads_per_trial,
                )
                for k, t in enumerate(batch)
            ]
            for t, f in zip(batch, futures, strict=True):
                record = f.result()
                append_record(out / "trials.jsonl", record)
                study.tell(t, record["objective"] if record["status"] == "ok" else float("inf"))
                done.append(record)
                log(f"trial {record['trial']}: {record['status']} objective {record['objective']:.4f}")
    return done


# ----- results -----


def best_record(records: list[dict]) -> dict:
    ok = [r for r in records if r["status"] == "ok" and math.isfinite(r["objective"])]
    if not ok:
        raise ValueError("no trial finished with a finite objective (every one diverged?)")
    return min(ok, key=lambda r: r["objective"])


def best_config(raw: dict, record: dict) -> dict:
    """The best set as TOML tables: [mup] and [model] values and the proxy width they were found at."""
    values = {**hyperparams_of(raw), **record["values"]}
    return {
        "proxy_width": base_width(raw) if raw["model"].get("use_mup") else raw["model"]["hidden_size"],
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


def transfer(best: dict, target: dict) -> dict:
    """The target config with the best set: under muP the searched values carry over unchanged and
    only mup_scale_factor changes, to the target's width over the proxy's."""
    if not best.get("use_mup", False):
        raise ValueError("the best set was searched without muP: its values do not transfer across widths")
    model = target.get("model", {})
    if not model.get("use_mup", False):
        raise ValueError("the target config has model.use_mup = false: muP transfer needs use_mup = true")
    proxy_width = float(best["proxy_width"])
    out = with_hyperparams(target, {**best["mup"], **best["model"]})
    out["model"]["mup_scale_factor"] = model["hidden_size"] / proxy_width
    return out


def transfer_report(best: dict, transferred: dict, path: Path) -> Path:
    """`path` (Markdown) and a PNG beside it: what each parameter class gets at the proxy and at the
    target (effective AdamW lr, init std) and the logit scale, i.e. what muP changed and what it kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM
    from teleflm.mup import MupHyperParams, init_std, param_class, param_groups

    hp = MupHyperParams(
        **{k: v for k, v in transferred["mup"].items() if k in MupHyperParams.__dataclass_fields__}
    )

    def effective(model_fields: dict) -> dict:
        config = TeleFLMConfig(**model_fields)
        with torch.device("meta"):
            model = TeleFLMForCausalLM(config)
        lr = {g["mup_class"]: g["lr"] for g in param_groups(model, config, hp)}
        std = {}
        for name, _ in model.named_parameters():  # first of each class: q_proj for matrices
            std.setdefault(param_class(name), init_std(name, config, hp))
        return {"width": config.hidden_size, "lr": lr, "std": std, "logit_scale": config.logit_scale}

    # Per-class settings depend on the width alone, so one head stands in for the proxy's heads.
    proxy_fields = {**transferred["model"], **best["model"], "hidden_size": int(best["proxy_width"])}
    proxy_fields.update(mup_scale_factor=1.0, num_attention_heads=1, num_key_value_heads=1)
    at = {"proxy": effective(proxy_fields), "target": effective(transferred["model"])}
    classes = sorted(at["target"]["lr"])
    rows = [
        f"| {kind} | {at['proxy']['lr'][kind]:.3g} | {at['target']['lr'][kind]:.3g} | "
        f"{at['proxy']['std'].get(kind) or 1:.3g} | {at['target']['std'].get(kind) or 1:.3g} |"
        for kind in classes
    ]
    text = "\n".join(
        [
            "# muP transfer",
            "",
            f"Proxy width {at['proxy']['width']} -> target width {at['target']['width']} "
            f"(mup_scale_factor {transferred['model']['mup_scale_factor']:g}). The searched values are copied "
            "unchanged; muP's rules turn them into these per-class settings:",
            "",
            "| class | lr at proxy | lr at target | init std at proxy | init std at target |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Logit scale (output_mult / mup_scale_factor): {at['proxy']['logit_scale']:.4g} at the proxy, "
            f"{at['target']['logit_scale']:.4g} at the target.",
            "",
            f"![transfer]({path.with_suffix('.png').name})",
            "",
        ]
    )
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key in zip(axes, ("lr", "std"), strict=True):
        for i, side in enumerate(("proxy", "target")):
            values = [at[side][key].get(kind) or 1.0 for kind in classes]
            ax.bar(
                [x + 0.4 * i for x in range(len(classes))],
                values,
                0.4,
                label=f"{side} (width {at[side]['width']})",
            )
        ax.set_xticks([x + 0.2 for x in range(len(classes))], classes)
        ax.set_yscale("log")
        ax.set_title("AdamW lr" if key == "lr" else "init std")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)
    path.write_text(text)
    return path

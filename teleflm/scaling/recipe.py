"""The Tele-FLM loop, end to end, on the embedded sample (`teleflm recipe`): search the muP
hyper-parameters on a narrow, shallow proxy, transfer them to a wider and deeper target, train a
ladder of the target's widths (several seeds each), forecast the target's loss, train the target,
and set the forecast beside the measured loss.

Every run is a short scored run on packed KJV windows (`teleflm.data.sample.kjv_windows`): the
first 10% are held out, and every loss here is the held-out loss in nats per token. Each stage
keeps its outputs in `out` and is skipped when they are there: a second call continues.
"""

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from teleflm.config import AT_LEAST_ONE, ConfigError, build, read_toml
from teleflm.tune.runs import (
    RunData,
    at_depth,
    at_width,
    parameter_count,
    scored_run,
    to_toml,
    training_flops,
)


@dataclass
class RecipeData:
    """The packed KJV windows every run trains on (`teleflm.data.sample.kjv_windows`)."""

    chars: int
    vocab_size: int
    context_length: int
    RANGES = dict.fromkeys(["chars", "vocab_size", "context_length"], AT_LEAST_ONE)


@dataclass
class ProxyShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    RANGES = dict.fromkeys(["hidden_size", "intermediate_size", "num_hidden_layers"], AT_LEAST_ONE)


@dataclass
class TargetShape:
    hidden_size: int
    num_hidden_layers: int
    RANGES = dict.fromkeys(["hidden_size", "num_hidden_layers"], AT_LEAST_ONE)


@dataclass
class RecipeLadder:
    widths: list[int]
    seeds: int = 3
    RANGES = {"seeds": AT_LEAST_ONE}


@dataclass
class Recipe:
    """A recipe TOML (`teleflm/cli/recipe.toml` is the shipped one): `train` holds the training
    tables every run shares, `search` a search space (docs/mup.md)."""

    head_dim: int
    data: RecipeData
    proxy: ProxyShape
    train: dict
    search: dict
    target: TargetShape
    ladder: RecipeLadder
    out: str = "runs/recipe"
    RANGES = {"head_dim": AT_LEAST_ONE}


def load_recipe(path: str | Path) -> Recipe:
    spec = build(Recipe, read_toml(path), str(path))
    proxy, target = spec.proxy, spec.target
    if target.hidden_size <= proxy.hidden_size or target.num_hidden_layers < proxy.num_hidden_layers:
        raise ConfigError(f"{path}: the target must be wider than the proxy and at least as deep")
    if max(spec.ladder.widths) >= target.hidden_size:
        raise ConfigError(f"{path}: the ladder's widths must stay below the target's ({target.hidden_size})")
    return spec


def proxy_config(spec: Recipe, out: Path) -> dict:
    """The proxy's training config: the shared [train] tables and the proxy's shape, muP at its own
    width and depth (both multipliers 1)."""
    data = spec.data
    model = dataclasses.asdict(spec.proxy)
    model.update(
        vocab_size=data.vocab_size,
        max_position_embeddings=data.context_length,
        num_attention_heads=spec.proxy.hidden_size // spec.head_dim,
        use_mup=True,
        mup_scale_factor=1.0,
        mup_depth_factor=1.0,
    )
    train = {k: dict(v) for k, v in spec.train.items()}
    train.setdefault("data", {})["context_length"] = data.context_length
    return {"out": str(out / "proxy"), **train, "model": model}


def recipe_sequences(data: RecipeData, path: Path) -> Path:
    """The packed KJV windows every run trains on, made once."""
    if not path.exists():
        from teleflm.data.sample import kjv_windows

        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, kjv_windows(data.chars, data.vocab_size, data.context_length))
    return path


def train_target(target: dict, out: Path, sequences: Path) -> dict:
    """The target trained once (read back when `out/measured.json` is there): its held-out loss."""
    measured_file = out / "measured.json"
    if measured_file.exists():
        return json.loads(measured_file.read_text())
    run = scored_run(target, out, RunData.from_file(sequences))
    if run["status"] != "ok":
        raise ValueError(f"the target run diverged ({run.get('error', 'non-finite loss')})")
    measured = {"loss": run["objective"], "step": run["step"]}
    measured_file.write_text(json.dumps(measured) + "\n")
    return measured


def run_recipe(spec: Recipe, out: Path, log=print) -> dict:
    """Every stage (skipping finished ones); returns the figures of the report."""
    from teleflm.scaling.ladder import LadderSpec, forecast, run_ladder
    from teleflm.scaling.ladder import write_report as write_ladder_report
    from teleflm.tune.report import write_results
    from teleflm.tune.search import load_space, search
    from teleflm.tune.transfer import transfer, transfer_report

    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.toml").write_text(to_toml(dataclasses.asdict(spec)))  # what this folder was made with
    seconds = {}
    clock = time.perf_counter()

    def done(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        log(f"== {stage}: {seconds[stage]:.0f}s")

    sequences = recipe_sequences(spec.data, out / "data" / "sequences.npy")
    n_windows = len(np.load(sequences, mmap_mode="r"))
    done("data")

    proxy = proxy_config(spec, out)
    (out / "proxy.toml").write_text(to_toml(proxy))
    (out / "space.toml").write_text(to_toml(spec.search))
    records = search(proxy, load_space(out / "space.toml"), out / "search", str(sequences), log=log)
    best = write_results(proxy, records, out / "search", str(out / "proxy.toml"))
    done("search")

    shape = spec.target
    target = at_depth(at_width(proxy, shape.hidden_size, head_dim=spec.head_dim), shape.num_hidden_layers)
    target = transfer(best, target)
    target["out"] = str(out / "target")
    (out / "target.toml").write_text(to_toml(target))
    transfer_report(best, target, out / "target.md")
    done("transfer")

    ladder = LadderSpec(
        base=target,
        widths=list(spec.ladder.widths),
        out=out / "ladder",
        seeds=spec.ladder.seeds,
        sequences=sequences,
        head_dim=spec.head_dim,
    )
    rungs = run_ladder(ladder, log)
    n_target = float(parameter_count(target["model"]))
    result = forecast(rungs, n_target, "target", "held-out loss (nats per token)", training_flops(target))
    write_ladder_report(result, out / "ladder", str(out / "recipe.toml"), "non-embedding")
    done("ladder and forecast")

    measured = train_target(target, out / "target", sequences)
    done("target")

    t = result.target
    figures = {
        "windows": n_windows,
        "trials": len(records),
        "best": best,
        "target_width": shape.hidden_size,
        "target_depth": shape.num_hidden_layers,
        "forecast": t.loss,
        "interval": [t.low, t.high] if t.has_interval else None,
        "measured": measured["loss"],
        "error": t.loss / measured["loss"] - 1,
        "inside": t.low <= measured["loss"] <= t.high if t.has_interval else None,
        "held_out_errors": result.held_out_errors(),
        "held_out_inside": result.held_out_inside(),
        "cost_share": result.cost_share,
        "seconds": seconds,
    }
    (out / "recipe.json").write_text(json.dumps(figures, indent=1) + "\n")
    write_report(spec, proxy, target, result, figures, out)
    return figures


def write_report(spec: Recipe, proxy: dict, target: dict, result, figures: dict, out: Path) -> Path:
    from teleflm.scaling.ladder import cost_text, held_out_lines, interval_text, plot

    plot(result, out / "recipe.png", measured=figures["measured"])
    p, t = proxy["model"], target["model"]
    best = figures["best"]
    searched = ", ".join(f"{k} {v:.3g}" for k, v in {**best["mup"], **best["model"]}.items())
    error, inside = figures["error"], figures["inside"]
    verdict = "inside" if inside else ("no interval" if inside is None else "OUTSIDE")
    lines = [
        "# The Tele-FLM recipe, end to end",
        "",
        f"Data: {figures['windows']} windows of {spec.data.context_length + 1} tokens of the embedded "
        f"KJV (byte-level BPE of {spec.data.vocab_size}), the first 10% held out; every loss is "
        "the held-out loss in nats per token after the same token budget.",
        "",
        "| stage | result | files |",
        "|---|---|---|",
        f"| search | {figures['trials']} trials on the proxy (width {p['hidden_size']}, {p['num_hidden_layers']} "
        f"layer(s)); best {searched}: {best['objective']:.4f} | search/search.md, search/search.png |",
        f"| transfer | width {p['hidden_size']} -> {t['hidden_size']} (mup_scale_factor "
        f"{t['mup_scale_factor']:g}), depth {p['num_hidden_layers']} -> {t['num_hidden_layers']} "
        f"(mup_depth_factor {t['mup_depth_factor']:g}) | target.toml, target.md |",
        f"| ladder | widths {spec.ladder.widths} x {len(result.rungs[0].losses)} seeds at the "
        f"target's depth | ladder/predict.md, ladder/predict.png |",
        f"| forecast | target (N = {result.target.size:,.0f}): **{figures['forecast']:.4f}**; "
        f"{interval_text(result.target)} | ladder/predict.md |",
        f"| target | trained once: **{figures['measured']:.4f}** | target/measured.json |",
        "",
        f"**Forecast error {error:+.2%}** (target: within 2%: {'met' if abs(error) <= 0.02 else 'missed'}); "
        f"the measured loss is {verdict} the forecast's interval.",
        "",
        *held_out_lines(result),
        "",
        cost_text(result),
        "",
        "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in figures["seconds"].items()) + ".",
        "",
        "![forecast vs measured](recipe.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

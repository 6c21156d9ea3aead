"""A ladder of muP models that differ only in width, trained with the same hyper-parameters and tokens,
and the loss forecast of a target model from it.

    config = "base.toml"         # the shared training config (relative to this file)
    widths = [64, 96, 128, 192]  # one rung per width, trained in <out>/w<width>
    out = "runs/ladder"
    sequences = "seqs.npy"       # optional: packed tokens instead of the config's shards
    head_dim = 32                # optional: fixed head dimension (default: the config's)
    parameters = "non_embedding" # or "total": what N counts

    [[points]]                   # optional: rungs trained elsewhere, as (N, loss)
    params = 1.2e7
    loss = 3.41

A rung that finished writes `rung.json`; running the ladder again reads it instead of retraining.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from teleflm.config import read_toml
from teleflm.scaling.fit import FitError, Prediction, check_ladder, predict
from teleflm.tune.runs import RunData, at_width, parameter_count, scored_run

KNOWN_KEYS = {"config", "widths", "out", "sequences", "head_dim", "parameters", "points"}


@dataclass
class Rung:
    params: float
    loss: float
    width: int | None = None  # None: a point given in the ladder file


@dataclass
class LadderSpec:
    base: dict
    widths: list[int]
    out: Path
    sequences: Path | None = None
    head_dim: int | None = None
    non_embedding: bool = True
    points: list[Rung] = field(default_factory=list)


def load_ladder(path: str | Path) -> LadderSpec:
    path = Path(path)
    raw = read_toml(path)
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(KNOWN_KEYS)}")
    widths = [int(w) for w in raw.get("widths", [])]
    if widths and any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise FitError(f"{path}: widths must strictly increase, got {widths}")
    if widths and "config" not in raw:
        raise ValueError(f"{path}: `widths` needs `config`, the training config every rung shares")
    if raw.get("parameters", "non_embedding") not in ("non_embedding", "total"):
        raise ValueError(f"{path}: parameters must be 'non_embedding' or 'total'")
    here = path.parent
    base = read_toml(here / raw["config"]) if "config" in raw else {}
    if widths and not base.get("model", {}).get("use_mup", False):
        raise ValueError(f"{path}: the ladder's config has model.use_mup = false; muScaling needs muP")
    points = []
    for i, p in enumerate(raw.get("points", [])):
        if set(p) != {"params", "loss"}:
            raise ValueError(f"{path}: points[{i}] needs exactly `params` and `loss`, got {sorted(p)}")
        points.append(Rung(float(p["params"]), float(p["loss"])))
    sizes = [p.params for p in points]
    if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise FitError(f"{path}: points must be listed with strictly increasing params, got {sizes}")
    if len(widths) + len(points) < 3:
        raise FitError(
            f"{path}: {len(widths) + len(points)} rung(s); L(N) = a*N^b + c has three parameters, "
            "give at least 3 rungs"
        )
    return LadderSpec(
        base=base,
        widths=widths,
        out=here / raw.get("out", "runs/ladder"),
        sequences=here / raw["sequences"] if "sequences" in raw else None,
        head_dim=raw.get("head_dim"),
        non_embedding=raw.get("parameters", "non_embedding") == "non_embedding",
        points=points,
    )


def rung_config(spec: LadderSpec, width: int) -> dict:
    return at_width(spec.base, width, head_dim=spec.head_dim)


def run_ladder(spec: LadderSpec, log=print) -> list[Rung]:
    """Train every rung not finished yet (or read it), plus the given points; sorted by size."""
    rungs = list(spec.points)
    data = None
    for width in spec.widths:
        raw = rung_config(spec, width)
        n = parameter_count(raw["model"], spec.non_embedding)
        done = spec.out / f"w{width}" / "rung.json"
        if done.exists():
            record = json.loads(done.read_text())
            log(f"rung w{width}: read {done} (loss {record['loss']:.4f})")
        else:
            data = data or RunData.from_file(spec.sequences)
            log(f"rung w{width}: training {n:,} parameters")
            result = scored_run(raw, spec.out / f"w{width}", data)
            if result["status"] != "ok":
                raise FitError(f"rung w{width} diverged ({result.get('error', 'non-finite loss')})")
            record = {"width": width, "params": n, "loss": result["objective"], "step": result["step"]}
            done.write_text(json.dumps(record) + "\n")
        rungs.append(Rung(float(record["params"]), float(record["loss"]), width))
    return sorted(rungs, key=lambda r: r.params)


def metric_name(spec: LadderSpec) -> str:
    """What a rung's `loss` is: the objective its scored run returned (or what the points give)."""
    if not spec.widths:
        return "loss (as the ladder's points give it)"
    if spec.sequences is not None:
        return "held-out loss (nats per token)"
    return "held-out bits per byte (val.bpb)"


@dataclass
class Forecast:
    rungs: list[Rung]
    target: Prediction
    target_name: str
    held_out: Prediction | None  # the largest rung predicted from the others (>= 4 rungs)
    metric: str = "loss"  # what the rungs' losses measure (metric_name)

    @property
    def held_out_error(self) -> float | None:
        """Relative error of the self-check: (predicted - actual) / actual."""
        if self.held_out is None:
            return None
        return self.held_out.loss / self.rungs[-1].loss - 1


def forecast(
    rungs: list[Rung], target_params: float, target_name: str = "target", metric: str = "loss", seed: int = 0
) -> Forecast:
    sizes = [r.params for r in rungs]
    losses = [r.loss for r in rungs]
    check_ladder(sizes, losses)
    if target_params <= sizes[-1]:
        raise FitError(
            f"target has {target_params:,.0f} parameters, not more than the largest rung ({sizes[-1]:,.0f})"
        )
    target = predict(sizes, losses, target_params, seed=seed)
    held_out = predict(sizes[:-1], losses[:-1], sizes[-1], seed=seed) if len(rungs) >= 4 else None
    return Forecast(rungs, target, target_name, held_out, metric)


def plot(result: Forecast, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.array([r.params for r in result.rungs])
    losses = np.array([r.loss for r in result.rungs])
    t = result.target
    grid = np.geomspace(sizes[0] * 0.8, t.size * 1.25, 200)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(sizes, losses, "o", color="C0", label="ladder")
    ax.plot(
        grid, t.law(grid), "-", color="C0", lw=1, label=f"fit: {t.law.a:.3g}·N^{t.law.b:.3f} + {t.law.c:.3g}"
    )
    ax.errorbar(
        [t.size],
        [t.loss],
        yerr=[[t.loss - t.low], [t.high - t.loss]] if t.has_interval else None,
        fmt="*",
        color="C3",
        ms=10,
        capsize=3,
        label=f"{result.target_name}: {t.loss:.4f}",
    )
    if result.held_out is not None:
        h = result.held_out
        ax.plot(grid, h.law(grid), "--", color="C2", lw=1, label="fit without the largest rung")
        ax.plot(
            [h.size],
            [h.loss],
            "x",
            color="C2",
            ms=8,
            label=f"held-out prediction ({result.held_out_error:+.2%})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel(result.metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: Forecast, out: Path, ladder_path: str, what: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot(result, out / "predict.png")
    t = result.target
    lines = [
        "# muScaling loss prediction",
        "",
        f"Ladder `{ladder_path}`: {len(result.rungs)} rungs, N = {what} parameters, "
        f"L = {result.metric} of each rung at the same token count.",
        "",
        "| width | N | L |",
        "|---|---|---|",
        *[f"| {r.width or '-'} | {r.params:,.0f} | {r.loss:.4f} |" for r in result.rungs],
        "",
        f"Fit: L(N) = {t.law.a:.4g} · N^{t.law.b:.4f} + {t.law.c:.4f}",
        "",
        f"**{result.target_name}** (N = {t.size:,.0f}): predicted {result.metric} **{t.loss:.4f}**, "
        f"{interval_text(t)}.",
        "",
    ]
    if result.held_out is not None:
        h = result.held_out
        lines.append(
            f"Self-check: the largest rung (N = {h.size:,.0f}) predicted from the others: {h.loss:.4f} "
            f"vs measured {result.rungs[-1].loss:.4f}, error {result.held_out_error:+.2%}."
        )
    else:
        lines.append("Self-check skipped: it needs at least 4 rungs (3 to fit, 1 held out).")
    lines += ["", "![prediction](predict.png)", ""]
    path = out / "predict.md"
    path.write_text("\n".join(lines))
    return path


def target_params(config: dict, non_embedding: bool) -> float:
    if "model" not in config:
        raise ValueError("the target config has no [model] table")
    return float(parameter_count(config["model"], non_embedding))


def interval_text(p: Prediction) -> str:
    if not p.has_interval:
        return "no interval: three rungs fit the three-parameter law exactly, leaving no residual to resample"
    return f"90% residual-bootstrap interval [{p.low:.4f}, {p.high:.4f}] ({p.bootstrap_fits} refits)"


def describe(result: Forecast) -> str:
    t = result.target
    text = f"{result.target_name}: predicted {result.metric} {t.loss:.4f}; {interval_text(t)}"
    if result.held_out_error is not None and math.isfinite(result.held_out_error):
        text += f"; self-check on the largest rung {result.held_out_error:+.2%}"
    return text

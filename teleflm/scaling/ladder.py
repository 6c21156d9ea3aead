"""A ladder of muP models that differ only in width, trained with the same hyper-parameters and tokens
(several seeds per rung), and the loss forecast of a target model from it.

    config = "base.toml"         # the shared training config (relative to this file)
    widths = [64, 96, 128, 192, 256]  # one rung per width, trained in <out>/w<width>/s<seed>
    seeds = 3                    # runs per rung (init and data order); 2 or more give an interval
    out = "runs/ladder"
    sequences = "seqs.npy"       # optional: packed tokens instead of the config's shards
    head_dim = 32                # optional: fixed head dimension (default: the config's)
    parameters = "non_embedding" # or "total": what N counts

    [[points]]                   # optional: rungs trained elsewhere, as (N, loss or a loss per seed)
    params = 1.2e7
    loss = [3.41, 3.43]

A run that finished writes `rung.json`; running the ladder again reads it instead of retraining.
With 5 rungs or more, the two largest are also predicted from the others (held out).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from teleflm.config import AT_LEAST_ONE, POSITIVE, ConfigError, build, read_toml
from teleflm.scaling.fit import FitError, Prediction, check_ladder, predict
from teleflm.tune.runs import RunData, at_width, parameter_count, scored_run, seeded, training_flops

HELD_OUT = 2  # the largest rungs predicted from the rest; needs 3 more to fit


@dataclass
class Rung:
    params: float
    losses: list[float]  # one per seed
    width: int | None = None  # None: a point given in the ladder file
    flops: float = 0.0  # training FLOPs of all its seeds (0: trained elsewhere)

    @property
    def loss(self) -> float:
        return float(np.mean(self.losses))


@dataclass
class LadderSpec:
    base: dict
    widths: list[int]
    out: Path
    seeds: int = 1
    sequences: Path | None = None
    head_dim: int | None = None
    non_embedding: bool = True
    points: list[Rung] = field(default_factory=list)


@dataclass
class LadderPoint:
    """A rung trained elsewhere: its parameter count and its loss (one, or one per seed)."""

    params: float
    loss: float | list[float]
    RANGES = {"params": POSITIVE}


@dataclass
class LadderFile:
    """A ladder TOML as written (see the module's docstring); `load_ladder` checks it as a whole."""

    config: str | None = None
    widths: list[int] = field(default_factory=list)
    seeds: int = 1
    out: str = "runs/ladder"
    sequences: str | None = None
    head_dim: int | None = None
    parameters: Literal["non_embedding", "total"] = "non_embedding"
    points: list[LadderPoint] = field(default_factory=list)
    RANGES = {"seeds": AT_LEAST_ONE, "head_dim": AT_LEAST_ONE}


def load_ladder(path: str | Path) -> LadderSpec:
    path = Path(path)
    ladder = build(LadderFile, read_toml(path), str(path))
    widths = ladder.widths
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise FitError(f"{path}: widths must strictly increase, got {widths}")
    if widths and ladder.config is None:
        raise ConfigError(f"{path}: `widths` needs `config`, the training config every rung shares")
    here = path.parent
    base = read_toml(here / ladder.config) if ladder.config else {}
    if widths and not base.get("model", {}).get("use_mup", False):
        raise ConfigError(f"{path}: the ladder's config has model.use_mup = false; muScaling needs muP")
    points = [Rung(p.params, p.loss if isinstance(p.loss, list) else [p.loss]) for p in ladder.points]
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
        out=here / ladder.out,
        seeds=ladder.seeds,
        sequences=here / ladder.sequences if ladder.sequences else None,
        head_dim=ladder.head_dim,
        non_embedding=ladder.parameters == "non_embedding",
        points=points,
    )


def rung_config(spec: LadderSpec, width: int) -> dict:
    return at_width(spec.base, width, head_dim=spec.head_dim)


def run_ladder(spec: LadderSpec, log=print) -> list[Rung]:
    """Train every run not finished yet (or read it), plus the given points; sorted by size."""
    rungs = list(spec.points)
    data = None
    for width in spec.widths:
        raw = rung_config(spec, width)
        n = parameter_count(raw["model"], spec.non_embedding)
        losses = []
        for seed in range(spec.seeds):
            out = spec.out / f"w{width}" / f"s{seed}"
            done = out / "rung.json"
            if done.exists():
                record = json.loads(done.read_text())
                log(f"rung w{width} seed {seed}: read {done} (loss {record['loss']:.4f})")
            else:
                data = data or RunData.from_file(spec.sequences)
                log(f"rung w{width} seed {seed}: training {n:,} parameters")
                result = scored_run(seeded(raw, seed), out, data.shuffled(seed))
                if result["status"] != "ok":
                    raise FitError(
                        f"rung w{width} seed {seed} diverged ({result.get('error', 'non-finite loss')})"
                    )
                record = {"width": width, "seed": seed, "params": n, "loss": result["objective"]}
                done.write_text(json.dumps(record | {"step": result["step"]}) + "\n")
            losses.append(float(record["loss"]))
        rungs.append(Rung(float(n), losses, width, spec.seeds * training_flops(raw)))
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
    target: Prediction  # from every rung, for one run of the target
    target_name: str
    held_out: list[Prediction]  # the HELD_OUT largest rungs, each from the rungs below them
    metric: str = "loss"  # what the rungs' losses measure (metric_name)
    target_flops: float | None = None  # the target run's training FLOPs, when known

    def held_out_errors(self) -> list[float]:
        """Relative errors of the held-out predictions: (predicted - measured) / measured."""
        measured = self.rungs[len(self.rungs) - len(self.held_out) :]
        return [h.loss / r.loss - 1 for h, r in zip(self.held_out, measured, strict=True)]

    def held_out_inside(self) -> list[bool | None]:
        """Whether each held-out rung's measured mean lies inside its interval (None: no interval)."""
        measured = self.rungs[len(self.rungs) - len(self.held_out) :]
        return [
            h.low <= r.loss <= h.high if h.has_interval else None
            for h, r in zip(self.held_out, measured, strict=True)
        ]

    @property
    def ladder_flops(self) -> float:
        return sum(r.flops for r in self.rungs)

    @property
    def cost_share(self) -> float | None:
        """The ladder's training FLOPs (every rung and seed) over the target run's."""
        if not self.target_flops or not self.ladder_flops:
            return None
        return self.ladder_flops / self.target_flops


def forecast(
    rungs: list[Rung],
    target_params: float,
    target_name: str = "target",
    metric: str = "loss",
    target_flops: float | None = None,
    seed: int = 0,
) -> Forecast:
    sizes = [r.params for r in rungs]
    losses = [r.losses for r in rungs]
    check_ladder(sizes, [r.loss for r in rungs])
    if target_params <= sizes[-1]:
        raise FitError(
            f"target has {target_params:,.0f} parameters, not more than the largest rung ({sizes[-1]:,.0f})"
        )
    target = predict(sizes, losses, target_params, runs=1, seed=seed)
    held_out = []
    if len(rungs) >= HELD_OUT + 3:
        fit_on = len(rungs) - HELD_OUT
        held_out = [
            predict(sizes[:fit_on], losses[:fit_on], r.params, runs=len(r.losses), seed=seed)
            for r in rungs[fit_on:]
        ]
    return Forecast(rungs, target, target_name, held_out, metric, target_flops)


def plot(result: Forecast, path: Path, measured: float | None = None) -> None:
    """Each seed's loss (dots) and each rung's mean (circles), the fit on every rung with the target's
    interval, the held-out fit with its predictions of the largest rungs, and the target's measured
    loss when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = np.array([r.params for r in result.rungs])
    losses = np.array([r.loss for r in result.rungs])
    t = result.target
    grid = np.geomspace(sizes[0] * 0.8, t.size * 1.25, 200)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in result.rungs:
        ax.plot([r.params] * len(r.losses), r.losses, ".", color="C0", ms=3, alpha=0.6)
    ax.plot(sizes, losses, "o", color="C0", mfc="none", label="ladder (seed mean; dots: seeds)")
    ax.plot(
        grid, t.law(grid), "-", color="C0", lw=1, label=f"fit: {t.law.a:.3g}·N^{t.law.b:.3f} + {t.law.c:.3g}"
    )

    def point(p: Prediction, fmt: str, color: str, label: str) -> None:
        error = [[p.loss - p.low], [p.high - p.loss]] if p.has_interval else None
        ax.errorbar([p.size], [p.loss], yerr=error, fmt=fmt, color=color, ms=9, capsize=3, label=label)

    point(t, "*", "C3", f"{result.target_name}: forecast {t.loss:.4f}")
    if measured is not None:
        ax.plot([t.size], [measured], "D", color="k", ms=6, mfc="none", label=f"measured {measured:.4f}")
    if result.held_out:
        law = result.held_out[0].law
        ax.plot(
            grid, law(grid), "--", color="C2", lw=1, label=f"fit without the {len(result.held_out)} largest"
        )
        for h, error in zip(result.held_out, result.held_out_errors(), strict=True):
            point(h, "x", "C2", f"held-out prediction ({error:+.2%})")
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
    seeds = sorted({len(r.losses) for r in result.rungs})
    lines = [
        "# muScaling loss prediction",
        "",
        f"Ladder `{ladder_path}`: {len(result.rungs)} rungs x {'/'.join(map(str, seeds))} seed(s), "
        f"N = {what} parameters, L = {result.metric} of each rung at the same token count (mean over "
        "its seeds).",
        "",
        "| width | N | L (seed mean) | seeds |",
        "|---|---|---|---|",
        *[
            f"| {r.width or '-'} | {r.params:,.0f} | {r.loss:.4f} | {' '.join(f'{x:.4f}' for x in r.losses)} |"
            for r in result.rungs
        ],
        "",
        f"Fit: L(N) = {t.law.a:.4g} · N^{t.law.b:.4f} + {t.law.c:.4f}",
        "",
        f"**{result.target_name}** (N = {t.size:,.0f}): predicted {result.metric} **{t.loss:.4f}**, "
        f"{interval_text(t)}.",
        "",
        *held_out_lines(result),
        "",
    ]
    if result.cost_share is not None:
        lines += [cost_text(result), ""]
    lines += ["![prediction](predict.png)", ""]
    path = out / "predict.md"
    path.write_text("\n".join(lines))
    return path


def held_out_lines(result: Forecast) -> list[str]:
    if not result.held_out:
        return [
            f"Held-out check skipped: it needs at least {HELD_OUT + 3} rungs (3 to fit, {HELD_OUT} held out)."
        ]
    measured = result.rungs[len(result.rungs) - len(result.held_out) :]
    lines = [
        f"Held out: the {len(result.held_out)} largest rungs, predicted from the {len(result.rungs) - len(result.held_out)} below them:",
        "",
    ]
    for h, r, error, inside in zip(
        result.held_out, measured, result.held_out_errors(), result.held_out_inside(), strict=True
    ):
        where = {True: "inside", False: "OUTSIDE", None: "no"}[inside]
        lines.append(
            f"- width {r.width or '-'} (N = {h.size:,.0f}): predicted {h.loss:.4f}, measured {r.loss:.4f}, "
            f"error {error:+.2%}; {interval_text(h)}: {where} it"
        )
    return lines


def cost_text(result: Forecast) -> str:
    return (
        f"Ladder cost: {result.ladder_flops:.3g} training FLOPs (every rung and seed), "
        f"{result.cost_share:.2%} of the target run's {result.target_flops:.3g}."
    )


def target_params(config: dict, non_embedding: bool) -> float:
    if "model" not in config:
        raise ValueError("the target config has no [model] table")
    return float(parameter_count(config["model"], non_embedding))


def interval_text(p: Prediction) -> str:
    if not p.has_interval:
        return "no interval: one seed per rung measures no seed-to-seed scatter (give seeds >= 2)"
    what = (
        "the expected loss" if p.runs == 0 else ("one run" if p.runs == 1 else f"the mean of {p.runs} runs")
    )
    return (
        f"90% interval for {what} [{p.low:.4f}, {p.high:.4f}] from the seeds' scatter "
        f"({p.seed_std:.2%} per run, {p.refits} refits)"
    )


def describe(result: Forecast) -> str:
    t = result.target
    text = f"{result.target_name}: predicted {result.metric} {t.loss:.4f}; {interval_text(t)}"
    for h, error, inside in zip(
        result.held_out, result.held_out_errors(), result.held_out_inside(), strict=True
    ):
        where = {True: "inside", False: "outside", None: "no"}[inside]
        text += f"\nheld-out rung N = {h.size:,.0f}: error {error:+.2%}, {where} its interval"
    if result.cost_share is not None:
        text += "\n" + cost_text(result)
    return text

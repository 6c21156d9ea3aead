"""Coordinate check: is muP wired right, over width and over depth?

Train the same model at several widths (or depths) for a few steps and record the typical size of
each activation (mean |x| over its coordinates) at every step. Under muP the sizes stay flat as width
grows; under standard parametrization (SP) they grow (the logits first). Over depth, CompleteP's
residual scaling (each branch x proxy depth / depth) keeps them flat; width-only muP lets the
residual stream grow with depth. The verdict per quantity is the slope of log(size) against
log(width or depth), fitted over the second half of the steps (after the updates have taken over
from the initialisation).
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from teleflm import mup
from teleflm.tune.runs import at_depth, at_width, base_depth, base_width

# Per axis: the parametrization that must be flat, the one it is contrasted with, and the quantity
# of the latter that must grow (proof that the check can see a missing rule).
CHECKS = {"width": ("muP", "SP", "logits"), "depth": ("CompleteP", "muP", "residual")}


@dataclass
class CoordCheckResult:
    axis: str  # "width" or "depth"
    values: list[int]  # the widths or depths
    steps: int
    # sizes[parametrization][quantity] -> array (len(values), steps)
    sizes: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def slope(self, parametrization: str, quantity: str, step: int | None = None) -> float:
        """Fitted slope of log(size) against log(width or depth) at one step; by default over the
        second half of the steps (log sizes averaged), where the updates dominate the init and step
        noise averages out."""
        log_sizes = np.log(self.sizes[parametrization][quantity])
        y = log_sizes[:, step] if step is not None else log_sizes[:, self.steps // 2 :].mean(axis=1)
        return float(np.polyfit(np.log(self.values), y, 1)[0])

    def quantities(self) -> list[str]:
        return list(next(iter(self.sizes.values())))

    def verdicts(self, tolerance: float) -> list[dict]:
        rows = []
        for p in self.sizes:
            for q in self.quantities():
                s = self.slope(p, q)
                verdict = "flat" if abs(s) <= tolerance else ("growing" if s > 0 else "shrinking")
                rows.append({"parametrization": p, "quantity": q, "slope": s, "verdict": verdict})
        return rows


def record_sizes(model, config, tokens: torch.Tensor, hp: mup.MupHyperParams, steps: int) -> dict:
    """Sizes of the embedding output, each block's attention and MLP outputs (before any residual
    multiplier), the residual stream after the last block and the logits at each of `steps` training
    steps (recorded in the forward before each update), by forward hooks."""
    sizes: dict[str, list[float]] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            sizes.setdefault(name, []).append(output.detach().abs().mean().item())

        return hook

    inner = model.model
    input_mult = config.input_mult if config.use_mup else 1.0
    handles = [
        # The embedding table's output times input_mult is the input of layer 0.
        inner.embed_tokens.register_forward_hook(
            lambda _m, _i, out: sizes.setdefault("embedding", []).append(
                (out.detach() * input_mult).abs().mean().item()
            )
        )
    ]
    for i, layer in enumerate(inner.layers):
        handles.append(layer.self_attn.register_forward_hook(keep(f"layer{i}.attn")))
        handles.append(layer.mlp.register_forward_hook(keep(f"layer{i}.mlp")))
    handles.append(inner.layers[-1].register_forward_hook(keep("residual")))
    optimizer = torch.optim.AdamW(mup.param_groups(model, config, hp), betas=(0.9, 0.95))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    try:
        for _ in range(steps):
            logits = model(input_ids=inputs, use_cache=False).logits
            sizes.setdefault("logits", []).append(logits.detach().abs().mean().item())
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    return sizes


def check_values(axis: str, values: list[int]) -> None:
    if len(values) < 2 or sorted(set(values)) != list(values):
        raise ValueError(f"--{axis}s must be at least two increasing {axis}s, got {values}")


def coord_check(
    raw: dict,
    values: list[int],
    steps: int = 5,
    batch_size: int = 4,
    seq_len: int = 64,
    seed: int = 0,
    axis: str = "width",
) -> CoordCheckResult:
    """Run the check for a training config (raw TOML dict) over widths or depths: its [model] sets
    the other dimensions, vocabulary, FFN ratio and proxy width and depth; its [mup] section the
    hyper-parameters (constant lr, no schedule). Over depth, per-layer sizes are averaged over the
    layers ("attn", "mlp"), since depths differ in their layers."""
    from teleflm.config import build
    from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM
    from teleflm.train.config import MupSection

    check_values(axis, values)
    hp = build(MupSection, raw.get("mup", {}), "[mup]")  # a MupHyperParams (plus min_lr)
    model_raw = raw["model"]
    head_dim = model_raw["hidden_size"] // model_raw["num_attention_heads"]
    if axis == "width":
        head_dim = min(head_dim, values[0])
    proxy, proxy_depth = base_width(raw), base_depth(raw)
    vocab = model_raw["vocab_size"]
    seq_len = min(seq_len, model_raw.get("max_position_embeddings", seq_len))
    tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=torch.Generator().manual_seed(seed))

    def fields_for(p: str, value: int) -> dict:
        if axis == "width":
            fields = at_width(raw, value, head_dim=head_dim, proxy_width=proxy)["model"]
            fields["use_mup"] = p == "muP"
            if p == "SP":  # no width multiplier anywhere: init, learning rates and logits
                fields["mup_scale_factor"] = 1.0
            return fields
        fields = at_depth(raw, value, proxy_depth)["model"]
        if p == "muP":  # width-only muP: no depth multiplier, residual init / sqrt(2 x layers)
            fields["mup_depth_factor"] = 1.0
        return fields

    result = CoordCheckResult(axis=axis, values=list(values), steps=steps)
    for p in CHECKS[axis][:2]:
        per_value = []
        for value in values:
            config = TeleFLMConfig(**fields_for(p, value))
            torch.manual_seed(seed)
            model = TeleFLMForCausalLM(config)
            mup.init_weights(model, config, hp)
            sizes = record_sizes(model, config, tokens, hp, steps)
            if axis == "depth":
                for kind in ("attn", "mlp"):
                    per_layer = [sizes.pop(f"layer{i}.{kind}") for i in range(value)]
                    sizes[kind] = list(np.mean(per_layer, axis=0))
            per_value.append(sizes)
        result.sizes[p] = {q: np.array([v[q] for v in per_value]) for q in per_value[0]}
    return result


def plot(result: CoordCheckResult, path: Path) -> None:
    """A grid: one row per parametrization, one column per quantity; size vs width (or depth), a line
    per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantities = result.quantities()
    rows = list(result.sizes)
    fig, axes = plt.subplots(
        len(rows), len(quantities), figsize=(2.6 * len(quantities), 2.4 * len(rows)), squeeze=False
    )
    colors = plt.cm.viridis(np.linspace(0, 1, result.steps))
    for r, p in enumerate(rows):
        for c, q in enumerate(quantities):
            ax = axes[r][c]
            for t in range(result.steps):
                ax.plot(result.values, result.sizes[p][q][:, t], marker=".", color=colors[t], label=f"t={t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{p}: {q}\nslope {result.slope(p, q):+.2f}", fontsize=8)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("mean |x|", fontsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel(result.axis, fontsize=7)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: list[CoordCheckResult], out: Path, tolerance: float, config_path: str) -> Path:
    """coord_check.md: a verdict table per axis, and a PNG per axis (coord_check.png for width,
    coord_check_depth.png for depth)."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# muP coordinate check", ""]
    for result in results:
        png = "coord_check.png" if result.axis == "width" else f"coord_check_{result.axis}.png"
        plot(result, out / png)
        lines += [
            f"## Over {result.axis}",
            "",
            f"Config `{config_path}`, {result.axis}s {result.values}, {result.steps} steps (Adam, constant lr).",
            f"Size = mean |x| of each activation; slope of log(size) vs log({result.axis}) over the "
            f"second half of the steps; flat when |slope| <= {tolerance}.",
            "",
            "| parametrization | quantity | slope | verdict |",
            "|---|---|---|---|",
            *[
                f"| {v['parametrization']} | {v['quantity']} | {v['slope']:+.3f} | {v['verdict']} |"
                for v in result.verdicts(tolerance)
            ],
            "",
            f"![coordinate check over {result.axis}]({png})",
            "",
        ]
    path = out / "coord_check.md"
    path.write_text("\n".join(lines))
    return path


def passes(result: CoordCheckResult, tolerance: float) -> bool:
    """Wired right: every quantity of the checked parametrization flat (muP over width, CompleteP
    over depth) and the contrast's telltale quantity growing (SP's logits, width-only muP's residual)."""
    checked, contrast, telltale = CHECKS[result.axis]
    verdicts = result.verdicts(tolerance)
    flat = all(v["verdict"] == "flat" for v in verdicts if v["parametrization"] == checked)
    grows = [v for v in verdicts if v["parametrization"] == contrast and v["quantity"] == telltale]
    return flat and all(v["verdict"] == "growing" for v in grows)


def slope_table(result: CoordCheckResult) -> str:
    width = max(len(q) for q in result.quantities())
    rows = [f"over {result.axis}"]
    rows.append(f"{'quantity':<{width}}  " + "  ".join(f"{p:>9}" for p in result.sizes))
    for q in result.quantities():
        rows.append(f"{q:<{width}}  " + "  ".join(f"{result.slope(p, q):+9.3f}" for p in result.sizes))
    return "\n".join(rows)

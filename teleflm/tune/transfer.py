"""muP transfer: the proxy's best set written into a wider model's config, and a report of what each
parameter class gets at the proxy and at the target."""

from pathlib import Path

from teleflm.tune.runs import with_hyperparams


def transfer(best: dict, target: dict) -> dict:
    """The target config with the best set: under muP the searched values carry over unchanged and
    only the multipliers change: mup_scale_factor to the target's width over the proxy's, and
    mup_depth_factor to its depth over the proxy's (CompleteP; a best set from before proxy_depth
    was recorded leaves the target's own)."""
    if not best.get("use_mup", False):
        raise ValueError("the best set was searched without muP: its values do not transfer across widths")
    model = target.get("model", {})
    if not model.get("use_mup", False):
        raise ValueError("the target config has model.use_mup = false: muP transfer needs use_mup = true")
    proxy_width = float(best["proxy_width"])
    out = with_hyperparams(target, {**best["mup"], **best["model"]})
    out["model"]["mup_scale_factor"] = model["hidden_size"] / proxy_width
    if "proxy_depth" in best:
        out["model"]["mup_depth_factor"] = model["num_hidden_layers"] / float(best["proxy_depth"])
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
    target_depth = transferred["model"]["num_hidden_layers"]
    proxy_depth = int(best.get("proxy_depth", target_depth))
    proxy_fields = {**transferred["model"], **best["model"], "hidden_size": int(best["proxy_width"])}
    proxy_fields.update(mup_scale_factor=1.0, num_attention_heads=1, num_key_value_heads=1)
    proxy_fields.update(num_hidden_layers=proxy_depth, mup_depth_factor=1.0)
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
            f"Depth {proxy_depth} -> {target_depth} (mup_depth_factor "
            f"{transferred['model'].get('mup_depth_factor', 1.0):g}): each residual branch is multiplied by "
            f"{1 / transferred['model'].get('mup_depth_factor', 1.0):.4g} (CompleteP); init std and learning "
            "rates do not change with depth.",
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

"""One evaluation report: lm-evaluation-harness scores beside chance, and held-out bits per byte."""

import json
from pathlib import Path


def write_report(out: str | Path, model: str, scores: dict, bpb: dict | None) -> str:
    """Write `report.json` and `report.md` in `out`; returns the Markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps({"model": model, "harness": scores, "bpb": bpb}, indent=1) + "\n"
    )
    lines = [
        f"# Evaluation of `{model}`",
        "",
        "## lm-evaluation-harness (local tasks)",
        "",
        "| task | items | metric | score | chance |",
        "|---|---|---|---|---|",
    ]
    for task, s in scores.items():
        chance = f"{s['chance']:.3f}" if s.get("chance") is not None else ""
        for metric in [m for m in s if m not in ("n", "chance") and not m.endswith("_stderr")]:
            stderr = s.get(f"{metric}_stderr")
            score = f"{s[metric]:.3f}" + (f" ± {stderr:.3f}" if isinstance(stderr, float) else "")
            lines.append(f"| {task} | {s['n']} | {metric} | {score} | {chance} |")
    if bpb is not None:
        lines += [
            "",
            "## Held-out bits per byte",
            "",
            "| domain | bits/byte | tokens | bytes |",
            "|---|---|---|---|",
        ]
        for domain, r in bpb["domains"].items():
            lines.append(f"| {domain} | {r['bpb']:.4f} | {r['tokens']} | {r['bytes']} |")
        lines.append(f"| all | {bpb['bpb']:.4f} | | |")
    markdown = "\n".join(lines) + "\n"
    (out / "report.md").write_text(markdown)
    return markdown

"""What a run shows its user: a progress bar with rate and ETA, metrics as JSONL and TensorBoard,
events (spikes, rollbacks, checkpoints) in their own JSONL, and a loss-curve PNG."""

import json
import os
import time
from pathlib import Path


def keep_history(metrics: Path, start_step: int) -> list[dict]:
    """A resumed run's records so far: metrics.jsonl is rewritten without the rows an earlier attempt
    logged past the checkpoint it resumes from (they are redone), so the file holds one history."""
    lines, records = [], []
    for line in metrics.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of an attempt killed mid-write
            continue
        if record["step"] <= start_step:
            lines.append(line.rstrip("\n") + "\n")
            records.append(record)
    tmp = metrics.with_name(metrics.name + ".tmp")
    tmp.write_text("".join(lines))
    os.replace(tmp, metrics)
    return records


def event_line(step: int, kind: str, details: dict) -> str:
    return json.dumps({"step": step, "time": time.time(), "event": kind, **details}) + "\n"


def append_event(out: Path, step: int, kind: str, **details) -> None:
    """An event of the run recorded outside a trainer (growth between two stages' trainers)."""
    with (out / "events.jsonl").open("a") as events:
        events.write(event_line(step, kind, details))
    print(f"[step {step}] {kind}: {details}")


class Monitor:
    """Writes only on the process that owns it (rank 0); elsewhere every method is a no-op."""

    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool, progress_bar: bool):
        self.enabled = enabled
        self.out = out
        self.history: list[dict] = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        out.mkdir(parents=True, exist_ok=True)
        metrics = out / "metrics.jsonl"
        if metrics.is_file():
            self.history = keep_history(metrics, start_step)
        self.metrics = metrics.open("a")
        self.events = (out / "events.jsonl").open("a")
        # purge_step hides what an earlier attempt logged past the checkpoint, as keep_history drops it.
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress_bar
        )

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **record}
        self.history.append(record)
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, int | float):
                self.tb.add_scalar(key.replace(".", "/"), value, step)
        if "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def set_total(self, total_steps: int) -> None:
        """The run's length changed (a deadline moved its end)."""
        if self.enabled and self.bar.total != total_steps:
            self.bar.total = total_steps
            self.bar.refresh()

    def event(self, step: int, kind: str, **details) -> None:
        if not self.enabled:
            return
        self.events.write(event_line(step, kind, details))
        self.events.flush()
        self.bar.write(f"[step {step}] {kind}: {details}")

    def plot(self) -> None:
        """Loss (and held-out bits per byte, where measured) against tokens, as loss.png."""
        if not self.enabled or not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in self.history if "loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], lw=1, label="train loss (nats/token)")
        ax.set_xlabel("tokens")
        ax.set_ylabel("loss")
        evals = [r for r in self.history if "val.bpb" in r]
        if evals:
            ax2 = ax.twinx()
            ax2.plot(
                [r["tokens"] for r in evals],
                [r["val.bpb"] for r in evals],
                "o-",
                color="C1",
                label="held-out BPB",
            )
            ax2.set_ylabel("bits per byte")
            ax2.legend(loc="upper center")
        ax.legend(loc="upper right")
        ax.set_title(self.out.name)
        fig.tight_layout()
        fig.savefig(self.out / "loss.png", dpi=110)
        plt.close(fig)

    def close(self) -> None:
        if self.enabled:
            self.plot()
            self.bar.close()
            self.metrics.close()
            self.events.close()
            self.tb.close()

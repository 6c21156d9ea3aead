"""What a run shows its user: a progress bar with rate and ETA, metrics as JSONL and TensorBoard,
events (spikes, rollbacks, checkpoints) in their own JSONL, and a loss-curve PNG."""

import json
import time
from pathlib import Path


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
        self.metrics = (out / "metrics.jsonl").open("a")
        self.events = (out / "events.jsonl").open("a")
        self.tb = SummaryWriter(str(out / "tensorboard"))
        self.bar = tqdm(
            total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress_bar
        )
        if (out / "metrics.jsonl").stat().st_size:
            # A resumed run: keep the curve so far, minus steps that will be redone.
            with (out / "metrics.jsonl").open() as f:
                self.history = [r for r in map(json.loads, f) if r["step"] <= start_step]

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
        record = {"step": step, "time": time.time(), "event": kind, **details}
        self.events.write(json.dumps(record) + "\n")
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

"""`teleflm dpo`: Direct Preference Optimization with the pre-training Trainer.

The Trainer is the one loop (muP groups, schedule, spike guard, checkpoints and resume, dp and tp
layouts); DPO gives it a stream of pairs (`teleflm.sft.preference.PairStream`), the reference
log-probabilities of every pair, and the DPO objective. The reference is the starting model itself:
before the first step its log-probabilities of both sides of every pair are computed once (split
over the data-parallel ranks), and saved with the run (`dpo_reference.npz`), so a resumed run, whose
weights have moved, still compares with the model it started from. Held-out pairs are scored before
and after: the mean reward margin `(logp_c - ref_c) - (logp_r - ref_r)` and how often the model's own
log-probability prefers the chosen answer.
"""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch.distributed as dist

from teleflm.sft.config import SFTConfig, complete
from teleflm.sft.preference import PairSet, PairStream, prepare_pairs, split_heldout
from teleflm.sft.run import load_initial_weights

REFERENCE = "dpo_reference.npz"


def preference_figures(logps: np.ndarray, ref_logps: np.ndarray) -> dict:
    """Figures of pairs' (pairs, 2) log-probabilities under the policy and the reference."""
    margins = (logps[:, 0] - ref_logps[:, 0]) - (logps[:, 1] - ref_logps[:, 1])
    return {
        "pairs": len(logps),
        "reward_margin": float(margins.mean()),
        "reward_accuracy": float((margins > 0).mean()),
        "prefers_chosen": float((logps[:, 0] > logps[:, 1]).mean()),
    }


def reference_logps(trainer, train: PairSet, heldout: PairSet, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The starting model's log-probabilities of the training and held-out pairs: computed now on a
    fresh run (and saved by rank 0), read back on a resumed one."""
    if path.is_file():
        saved = np.load(path)
        if saved["train"].shape != (len(train), 2) or saved["heldout"].shape != (len(heldout), 2):
            raise ValueError(f"{path} was computed for other pairs: the data changed since the run started")
        return saved["train"], saved["heldout"]
    refs = trainer.pair_logps(train), trainer.pair_logps(heldout)
    if trainer.rank == 0:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, train=refs[0], heldout=refs[1])
        tmp.replace(path)
    if dist.is_initialized():
        dist.barrier()
    return refs


def run_dpo(cfg: SFTConfig, log=print) -> dict:
    """Prepare the pairs, tune (or resume), score the held-out pairs; returns the final figures."""
    from teleflm.data.tokenizer import load_tokenizer
    from teleflm.train import checkpoint
    from teleflm.train.trainer import Trainer

    t, d = cfg.train, cfg.sft
    pairs, report = prepare_pairs(d.data, load_tokenizer(t.data.tokenizer), t.data.context_length, d.on_error)
    train, heldout = split_heldout(pairs, d.heldout_fraction, t.data.seed)
    report.train, report.heldout = len(train), len(heldout)
    complete(cfg, 2 * len(train))
    for line in report.skipped_lines:
        log(f"skipped {line}")
    log(
        f"dpo data: {report.pairs} pairs, {len(report.skipped_lines)} lines skipped, {report.too_long} too "
        f"long; {report.train} to train on, {report.heldout} held out"
    )
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo_data.json").write_text(json.dumps(asdict(report), indent=1) + "\n")

    streams = []

    def stream_factory(rank: int, size: int) -> PairStream:
        streams.append(PairStream(train, np.zeros((len(train), 2)), t.data.seed, rank, size))
        return streams[-1]

    trainer = Trainer(t, stream_factory=stream_factory, dpo_beta=d.beta)
    if checkpoint.latest_checkpoint(trainer.checkpoint_root) is None:
        load_initial_weights(trainer.module, d.init)
        (out / REFERENCE).unlink(missing_ok=True)  # a fresh start: the reference is this model
    train_refs, heldout_refs = reference_logps(trainer, train, heldout, out / REFERENCE)
    streams[0].ref_logps = train_refs
    figures = {}
    if len(heldout):
        figures["before"] = preference_figures(heldout_refs, heldout_refs)
    result = trainer.run()
    if len(heldout):
        figures["after"] = preference_figures(trainer.pair_logps(heldout), heldout_refs)
        if trainer.rank == 0:
            (out / "dpo_eval.json").write_text(json.dumps(figures, indent=1) + "\n")
        for when, f in figures.items():
            log(
                f"held-out pairs {when}: reward margin {f['reward_margin']:.4f}, reward accuracy "
                f"{f['reward_accuracy']:.0%}, prefers the chosen answer {f['prefers_chosen']:.0%}"
            )
        result |= {f"heldout.{k}": v for k, v in figures["after"].items() if k != "pairs"}
    return result

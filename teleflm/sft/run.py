"""`teleflm sft`: supervised fine-tuning with the pre-training Trainer on a packed chat set.

The Trainer is the pre-training loop unchanged (muP groups, schedule, spike guard, checkpoints and
resume, every parallel layout); fine-tuning gives it a stream whose batches carry a loss mask and
document ids, and starts it from the weights of `sft.init` instead of a fresh initialisation.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from teleflm.sft.config import SFTConfig, complete
from teleflm.sft.data import PackedStream, prepare_chat_data


def source_state_dict(init: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a teleflm checkpoint or an export, on the CPU."""
    from teleflm.model.io import load_pretrained
    from teleflm.train.checkpoint import TRAINER_STATE, load_model

    if (Path(init) / TRAINER_STATE).is_file():
        model, _ = load_model(Path(init))
    else:
        model, _ = load_pretrained(init, dtype=torch.float32, device="cpu")
    return model.state_dict()


def load_initial_weights(module: torch.nn.Module, init: str | Path) -> None:
    """Copy the weights of `init` into the trainer's (possibly sharded, tensor-parallel or
    pipeline-stage) module. Every rank reads the full weights and keeps its own part of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = source_state_dict(init)
    wanted = module.state_dict().keys()  # a pipeline stage holds only its own layers
    set_model_state_dict(
        module, {name: full[name] for name in wanted}, options=StateDictOptions(full_state_dict=True)
    )


def run_sft(cfg: SFTConfig, log=print) -> dict:
    """Prepare the chat data, fine-tune (or resume), export at the end; returns the final figures."""
    from teleflm.data.tokenizer import load_tokenizer
    from teleflm.train import checkpoint
    from teleflm.train.trainer import Trainer

    t, s = cfg.train, cfg.sft
    tokenizer = load_tokenizer(t.data.tokenizer)
    packed, report = prepare_chat_data(
        s.data,
        tokenizer,
        t.data.tokenizer,
        t.data.context_length,
        on_error=s.on_error,
        packing=s.pack,
        eval_sets=s.decontaminate,
        ngram=s.ngram,
        text_field=s.text_field,
    )
    complete(cfg, len(packed.tokens))
    for line in report.skipped_lines:
        log(f"skipped {line}")
    log(
        f"sft data: {report.conversations} conversations, {len(report.skipped_lines)} lines skipped, "
        f"{report.dropped_old_turns} lost old turns, {report.cut_at_end} cut at the end, "
        f"{report.dropped_no_target} dropped, {report.contaminated} contaminated; {report.sequences} "
        f"sequences of {t.data.context_length + 1} tokens, {report.fill:.0%} filled, "
        f"{report.target_tokens} learned tokens"
    )
    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_data.json").write_text(json.dumps(asdict(report), indent=1) + "\n")

    trainer = Trainer(t, stream_factory=lambda rank, size: PackedStream(packed, t.data.seed, rank, size))
    if checkpoint.latest_checkpoint(trainer.checkpoint_root) is None:
        load_initial_weights(trainer.module, s.init)
    return trainer.run()

"""A run ends with a Hugging Face export of its final checkpoint; `teleflm export` also takes a
training checkpoint."""

import torch

from teleflm.cli.main import main
from teleflm.data.synthetic import ArrayStream
from teleflm.model.io import load_pretrained
from teleflm.testing import pattern_sequences, tiny_train_config
from teleflm.train.checkpoint import load_model
from teleflm.train.trainer import Trainer


def test_run_exports_its_final_checkpoint(tmp_path):
    cfg = tiny_train_config(
        tmp_path / "run", schedule={"total_tokens": 8 * 32 * 3}, checkpoint={"export_at_end": True}
    )
    sequences = pattern_sequences()
    trainer = Trainer(cfg, stream_factory=lambda r, n: ArrayStream(sequences, r, n))
    trainer.run()
    ids = torch.from_numpy(sequences[:2, :32])
    with torch.no_grad():
        live = trainer.module(input_ids=ids).logits
        exported, _ = load_pretrained(tmp_path / "run" / "export", device="cpu")
        assert torch.equal(exported(input_ids=ids).logits, live)
        from_checkpoint, state = load_model(tmp_path / "run" / "checkpoints" / "step-00000003")
        assert torch.equal(from_checkpoint(input_ids=ids).logits, live)
    assert state["step"] == 3

    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "run/checkpoints/step-00000003"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 0
    )
    again, _ = load_pretrained(tmp_path / "x", device="cpu")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, live)

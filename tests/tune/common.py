"""The tiny muP proxy that the search and ladder tests train."""

from pathlib import Path

from teleflm.testing import CONTEXT


def proxy_config(out: Path) -> dict:
    """A width-32 muP proxy: 6 steps of 4 x 32 tokens (about a second per trial)."""
    return {
        "out": str(out / "run"),
        "model": dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=CONTEXT,
            use_mup=True,
            mup_scale_factor=1.0,
            output_mult=1.0,
        ),
        "mup": {"lr": 1e-2, "matrix_lr": 1e-2, "min_lr": 1e-3, "std": 0.02, "matrix_std": 0.02},
        "data": {"context_length": CONTEXT},
        "batch": {"global_batch_tokens": CONTEXT * 4, "micro_batch_size": 4},
        "schedule": {"total_tokens": CONTEXT * 4 * 6, "warmup_steps": 1},
        "parallel": {"mixed_precision": "fp32"},
    }

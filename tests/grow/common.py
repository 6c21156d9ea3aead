"""Real-text batches and small muP models shared by the growth tests."""

import functools

import numpy as np
import torch

from teleflm import mup
from teleflm.grow.masks import GrowthMasks
from teleflm.grow.operators import grow_weights
from teleflm.grow.plan import make_plan
from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM
from tests.conftest import sample_text

VOCAB = 384
CONTEXT = 32
# The growth most tests make: width x2 (heads with it, kv heads too) and depth x2 of small_config.
WIDTH_X2_DEPTH_X2 = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4
)
# Larger than the card's init, so that the logits are O(1) like a trained model's and 1e-5 means something.
HP = mup.MupHyperParams(std=0.5, matrix_std=0.5)


@functools.cache
def kjv_tokens() -> np.ndarray:
    """Token ids of a slice of the King James Bible under a byte-level BPE of 384 entries, trained
    on the slice before it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = sample_text("kjv")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([text[:100_000]], trainer)
    assert tokenizer.get_vocab_size() == VOCAB
    return np.array(tokenizer.encode(text[100_000:160_000]).ids, dtype=np.int64)


def kjv_sequences(n: int, length: int = CONTEXT + 1, offset: int = 0) -> np.ndarray:
    tokens = kjv_tokens()
    return np.stack([tokens[offset + i * length : offset + (i + 1) * length] for i in range(n)])


def small_config(**fields) -> TeleFLMConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_mup=True,
        mup_scale_factor=2.0,
        output_mult=0.5,
    )
    return TeleFLMConfig(**{**base, **fields})


@torch.no_grad()
def trained_like_model(config: TeleFLMConfig, seed: int = 0) -> TeleFLMForCausalLM:
    """A model whose every weight differs from its init pattern (norm weights too), so a misplaced
    tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    model = TeleFLMForCausalLM(config).eval()
    mup.init_weights(model, config, HP)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.add_(0.3 * torch.randn_like(p))
        else:
            p.mul_(1 + 0.5 * torch.rand_like(p))
    return model


def grow_model(
    model: TeleFLMForCausalLM, target: dict, layers_at=None, layer_init: str = "copy", ramp_steps: int = 10
) -> tuple[TeleFLMForCausalLM, GrowthMasks]:
    """The grown model (eval mode) with its masks installed at the start of their ramp."""
    config, plan = make_plan(model.config, target, layers_at, layer_init)
    grown = TeleFLMForCausalLM(config).eval()
    grown.load_state_dict(grow_weights(model.state_dict(), plan, config, HP, seed=1))
    masks = GrowthMasks(plan, start_step=0, ramp_steps=ramp_steps).install(grown)
    masks.set_step(0)
    return grown, masks

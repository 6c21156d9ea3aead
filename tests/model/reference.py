"""Tiny random Tele-FLM models and their transformers Llama twin, the parity reference."""

import inspect

import torch

MUP = dict(use_mup=True, input_mult=3.0, output_mult=2.0, mup_scale_factor=4.0)


def random_model(seed: int = 0, **overrides):
    """A tiny Tele-FLM in fp32 with weights large enough that logits are of order 1 (so a wrong
    multiplier or a wrong weight shows) and norm weights away from 1 (so a skipped norm shows)."""
    from teleflm.model import TeleFLMForCausalLM
    from teleflm.testing import tiny_config  # here: tests/compat imports this file without teleflm

    torch.manual_seed(seed)
    model = TeleFLMForCausalLM(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def llama_twin(model):
    """transformers' LlamaForCausalLM holding `model`'s weights (eager attention: a second, independent
    implementation). With muP the embedding table is multiplied by input_mult, so Llama's logits times
    `output_mult / mup_scale_factor` must equal ours."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    # transformers 5 takes RoPE settings as rope_parameters, 4 as rope_theta (tests/compat runs on both).
    rope = (
        {"rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}
        if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters
        else {"rope_theta": c.rope_theta}
    )
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
        **rope,
    )
    config._attn_implementation = "eager"
    reference = LlamaForCausalLM(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if c.use_mup:
        state["model.embed_tokens.weight"] *= c.input_mult
    reference.load_state_dict(state, strict=True)
    return reference.eval()


def logit_scale(model) -> float:
    c = model.config
    return c.output_mult / c.mup_scale_factor if c.use_mup else 1.0

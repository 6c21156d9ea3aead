"""Our model computes exactly transformers' Llama, up to the two muP multipliers (SPEC section 1)."""

import pytest
import torch

from tests.model.reference import MUP, llama_twin, logit_scale, random_model

VARIANTS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mha-mup": dict(num_key_value_heads=4, **MUP),
    "gqa-mup": dict(num_key_value_heads=2, **MUP),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_llama(variant):
    model = random_model(**VARIANTS[variant])
    reference = llama_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = reference(ids).logits
    assert theirs.abs().mean() > 0.5  # logits of order 1: a 1e-5 match means something
    assert (ours - theirs * logit_scale(model)).abs().max().item() <= 1e-5
    if model.config.use_mup:  # the multipliers really act: plain Llama is far off
        assert (ours - theirs).abs().max().item() > 0.1


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_generation_matches_llama(variant):
    """20 greedy tokens with the KV cache, on a left-padded batch: same tokens, and every step's
    logits equal Llama's times the logit scale."""
    model = random_model(**VARIANTS[variant])
    reference = llama_twin(model)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0  # row 1 is left-padded
    settings = dict(
        attention_mask=mask,
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        ours = model.generate(ids, **settings)
        theirs = reference.generate(ids, **settings)
        uncached = model.generate(ids, **{**settings, "use_cache": False})
    assert ours.sequences.shape == (2, 32)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert torch.equal(ours.sequences, uncached.sequences)
    step_diff = max(
        (a - b * logit_scale(model)).abs().max().item()
        for a, b in zip(ours.logits, theirs.logits, strict=True)
    )
    assert step_diff <= 1e-5
    # Generated tokens vary (a degenerate model repeating one token would prove little).
    assert len(set(ours.sequences[:, 12:].flatten().tolist())) > 5


def test_logit_scale_of_the_released_52b_config():
    """SPEC: the effective logit scale of Tele-FLM 52B is output_mult / mup_scale_factor = 1/32."""
    model = random_model(use_mup=True, input_mult=1.0, output_mult=0.5, mup_scale_factor=16.0)
    reference = llama_twin(model)
    ids = torch.arange(4, 36)[None]
    with torch.no_grad():
        ratio = model(ids).logits / reference(ids).logits
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / 32), rtol=1e-3)


def test_depth_factor_divides_each_residual_branch():
    """CompleteP's mup_depth_factor f (muP only): the model equals Llama whose o_proj and down_proj
    (the branches' last, linear, projections) are divided by f; without muP it is ignored."""
    model = random_model(num_key_value_heads=2, **MUP, mup_depth_factor=4.0)
    reference = llama_twin(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p /= 4.0
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
        plain = llama_twin(model)(ids).logits
    assert (ours - theirs * logit_scale(model)).abs().max().item() <= 1e-5
    assert (ours - plain * logit_scale(model)).abs().max().item() > 0.1  # the factor really acts
    sp = random_model(num_key_value_heads=2, mup_depth_factor=4.0)
    with torch.no_grad():
        assert torch.equal(sp(ids).logits, random_model(num_key_value_heads=2)(ids).logits)

"""At the moment of growth the grown model computes the old function: logits agree to 1e-5 (fp32)
on real text (KJV, byte-level BPE), for each operator and for width + depth together; during the
ramp the function moves; at its end the masks come off without a jump."""

import pytest
import torch

from tests.grow.common import (
    HP,
    WIDTH_X2_DEPTH_X2,
    grow_model,
    kjv_sequences,
    small_config,
    trained_like_model,
)

# Width grows with the heads (head_dim is fixed at hidden / heads, as in every released Tele-FLM).
GROWTHS = {
    "hidden+heads (kv heads kept: 2 -> 4 query heads per kv head)": (
        dict(hidden_size=128, num_attention_heads=8),
        {},
    ),
    "hidden+heads+kv heads": (dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4), {}),
    "ffn": (dict(intermediate_size=320), {}),
    "layers copied, spread": (dict(num_hidden_layers=4), {}),
    "layers copied at 0 and 3": (dict(num_hidden_layers=4), dict(layers_at=[0, 3])),
    "layers interpolated": (dict(num_hidden_layers=5), dict(layers_at=[1, 2, 4], layer_init="interpolate")),
    "layers stacked (G_stack)": (dict(num_hidden_layers=4), dict(layers_at=[2, 3], layer_init="stack")),
    "width x2 + depth x2": (WIDTH_X2_DEPTH_X2, {}),
}


@pytest.fixture(scope="module")
def old_model():
    return trained_like_model(small_config())


@pytest.fixture(scope="module")
def ids():
    return torch.from_numpy(kjv_sequences(4))[:, :-1]


@pytest.mark.parametrize("growth", list(GROWTHS))
@torch.no_grad()
def test_grown_model_computes_the_old_function(growth, old_model, ids):
    target, options = GROWTHS[growth]
    before = old_model(input_ids=ids).logits
    grown, masks = grow_model(old_model, target, **options)
    after = grown(input_ids=ids).logits
    assert (after - before).abs().max().item() <= 1e-5
    assert before.abs().max().item() > 0.1  # logits of real size, or agreement would prove little

    # Halfway through the ramp the new capacity shows: the function has moved.
    masks.set_step(5)
    assert (grown(input_ids=ids).logits - before).abs().max().item() > 1e-3
    # At the end of the ramp the masks are the identity: removing them changes nothing.
    masks.set_step(10)
    ramped = grown(input_ids=ids).logits
    masks.remove()
    assert torch.allclose(grown(input_ids=ids).logits, ramped, atol=1e-5)


@torch.no_grad()
def test_stacking_repeats_the_old_layers_in_order(old_model):
    """layer_init "stack" with the new layers at the end: layers 0, 1, 0, 1 (G_stack's operator)."""
    grown, _ = grow_model(old_model, dict(num_hidden_layers=4), layers_at=[2, 3], layer_init="stack")
    old, new = old_model.model.layers, grown.model.layers
    for position, source in enumerate((0, 1, 0, 1)):
        assert torch.equal(new[position].mlp.down_proj.weight, old[source].mlp.down_proj.weight)
        assert torch.equal(new[position].self_attn.q_proj.weight, old[source].self_attn.q_proj.weight)


@torch.no_grad()
def test_without_masks_the_function_changes(old_model, ids):
    """The masks are what preserves the function (the test above could fail)."""
    target, _ = GROWTHS["width x2 + depth x2"]
    grown, masks = grow_model(old_model, target)
    masks.remove()
    assert (grown(input_ids=ids).logits - old_model(input_ids=ids).logits).abs().max().item() > 1e-2


@torch.no_grad()
def test_mup_bookkeeping_follows_the_width(old_model):
    target, _ = GROWTHS["width x2 + depth x2"]
    grown, _ = grow_model(old_model, target)
    assert grown.config.mup_scale_factor == 4.0  # 2.0 x 128 / 64
    assert grown.config.logit_scale == old_model.config.logit_scale / 2
    # The old block sits top-left (same kv grouping here): q_proj of layer 0 (old layer 0).
    old_q = old_model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(grown.model.layers[0].self_attn.q_proj.weight[:64, :64], old_q)
    # New entries follow the muP init of the new width: std matrix_std / sqrt(4).
    fresh = grown.model.layers[0].mlp.up_proj.weight[128:, :]
    assert fresh.std().item() == pytest.approx(HP.matrix_std / 2, rel=0.1)


@torch.no_grad()
def test_attention_biases_grow_with_their_weights(ids):
    """attention_bias = true: old biases keep their slots (query heads at their planned positions),
    new entries start at zero, and the grown model computes the old function."""
    old = trained_like_model(small_config(attention_bias=True))
    for name, p in old.named_parameters():
        if name.endswith(".bias"):
            p.normal_(0.0, 0.3)
    target, _ = GROWTHS["width x2 + depth x2"]
    grown, _ = grow_model(old, target)
    assert (grown(input_ids=ids).logits - old(input_ids=ids).logits).abs().max().item() <= 1e-5
    old_q, new_q = old.model.layers[1].self_attn.q_proj.bias, grown.model.layers[2].self_attn.q_proj.bias
    # 4 old heads of 16 dims; 2 query heads per kv head before and after: top-left, new heads zero.
    assert torch.equal(new_q.view(8, 16)[:4], old_q.view(4, 16)) and not new_q[64:].any()
    o = grown.model.layers[2].self_attn.o_proj.bias
    assert torch.equal(o[:64], old.model.layers[1].self_attn.o_proj.bias) and not o[64:].any()

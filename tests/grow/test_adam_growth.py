"""Growing AdamW's state: every old moment keeps its slot (the readout's rescaled with its weight),
new entries start at zero, step counts and muP learning rates follow; and a few steps after a growth
the old weights move exactly as the ungrown model's would."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from teleflm import mup
from teleflm.grow.masks import GrowthMasks
from teleflm.grow.operators import grow_adam_state, grow_weights, renumber, slot_maps
from teleflm.grow.plan import make_plan
from teleflm.model import TeleFLMForCausalLM
from tests.grow.common import HP, kjv_sequences, small_config, trained_like_model

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def optimizer(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(mup.param_groups(model, model.config, HP), betas=(0.9, 0.95))


def train(model, opt, batches, masks=None, step=0) -> None:
    for tokens in batches:
        if masks is not None:
            masks.set_step(step)  # m = 0: the grown model computes the old function exactly
        logits = model(input_ids=tokens[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def batches(n: int, offset: int) -> list[torch.Tensor]:
    return [torch.from_numpy(kjv_sequences(4, offset=offset + 4 * 33 * i)) for i in range(n)]


def trained(config):
    model = trained_like_model(config).train()
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            torch.nn.init.normal_(p, 0.0, 0.1)
    opt = optimizer(model)
    train(model, opt, batches(3, 0))
    return model, opt


def grown(model, opt, target):
    config, plan = make_plan(model.config, target)
    model_sd, optim_sd = get_state_dict(model, opt, options=FLAT)
    new = TeleFLMForCausalLM(config).train()
    new.load_state_dict(grow_weights(model_sd, plan, config, HP, seed=1))
    new_opt = optimizer(new)
    moments = grow_adam_state(optim_sd, plan, config, mup.width_mult(model.config), mup.width_mult(config))
    set_state_dict(new, new_opt, model_state_dict=new.state_dict(), optim_state_dict=moments, options=FLAT)
    return new, new_opt, plan, optim_sd, moments


def test_moments_keep_their_slots_and_new_entries_are_zero():
    target = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_hidden_layers=4)
    model, opt = trained(small_config(attention_bias=True))
    new, _, plan, old, moments = grown(model, opt, target)
    assert plan.readout_rescale == 2.0  # the logit scale halves with the width: lm_head doubles
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith(".bias") for n in names)
    for name in names:
        new_name = renumber(name, plan)
        for field, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            before, after = old[f"state.{name}.{field}"], moments[f"state.{new_name}.{field}"]
            expected = before / plan.readout_rescale**power if name == "lm_head.weight" else before
            index = torch.zeros_like(after, dtype=torch.bool)
            maps = [
                m if m is not None else torch.arange(n)
                for m, n in zip(slot_maps(name, plan), before.shape, strict=True)
            ]
            index[torch.meshgrid(*maps, indexing="ij")] = True
            assert torch.equal(after[index].view(before.shape), expected), (name, field)
            assert not after[~index].any(), (name, field)
        assert moments[f"state.{new_name}.step"] == old[f"state.{name}.step"] == 3
        lr = old[f"param_groups.{name}.lr"]
        scale = 0.5 if mup.param_class(name) == mup.MATRIX else 1.0  # width_mult 2 -> 4
        assert moments[f"param_groups.{new_name}.lr"] == pytest.approx(lr * scale)
    for position in plan.new_layer_positions:  # new layers: zero moments, their source's step
        prefix = f"state.model.layers.{position}."
        new_layer = {k: v for k, v in moments.items() if k.startswith(prefix)}
        assert new_layer and all(
            (v == 3).all() if k.endswith(".step") else not v.any() for k, v in new_layer.items()
        )


@pytest.mark.parametrize(
    "target", [dict(intermediate_size=320), dict(num_hidden_layers=4)], ids=["ffn", "layers"]
)
def test_after_growth_the_old_weights_move_as_the_ungrown_models(target):
    """Three Adam steps with the masks at 0: the grown model computes the old function, so its old
    entries see the old gradients and, with their moments kept, take the old model's steps; new
    entries see zero gradients and, with zero moments, stay where growth put them. Moments reset to
    zero, or new ones copied, would show here."""
    model, opt = trained(small_config())
    new, new_opt, plan, _, _ = grown(model, opt, target)
    masks = GrowthMasks(plan, start_step=3, ramp_steps=100).install(new)
    start = {n: p.detach().clone() for n, p in new.named_parameters()}
    old_start = {n: p.detach().clone() for n, p in model.named_parameters()}
    more = batches(3, 4 * 33 * 3)
    train(model, opt, more)
    train(new, new_opt, more, masks, step=3)
    grown_params = dict(new.named_parameters())
    for name, p in model.named_parameters():
        new_name = renumber(name, plan)
        after = grown_params[new_name]
        maps = [
            m if m is not None else torch.arange(n)
            for m, n in zip(slot_maps(name, plan), p.shape, strict=True)
        ]
        index = torch.zeros_like(after, dtype=torch.bool)
        index[torch.meshgrid(*maps, indexing="ij")] = True
        assert torch.allclose(after[index].view(p.shape), p, atol=1e-6), name
        assert torch.equal(after[~index], start[new_name][~index]), name
    assert all(not torch.equal(p, old_start[n]) for n, p in model.named_parameters())  # it did train
    for position in plan.new_layer_positions:
        for name, p in grown_params.items():
            if name.startswith(f"model.layers.{position}."):
                assert torch.equal(p, start[name]), name

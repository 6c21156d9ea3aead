"""muP rules (SPEC section 2): init per parameter class and AdamW learning rates, at two widths."""

import math

import pytest
import torch

from teleflm.model import TeleFLMForCausalLM
from teleflm.mup import (
    EMBEDDING,
    MATRIX,
    READOUT,
    VECTOR,
    MupHyperParams,
    init_weights,
    param_class,
    param_groups,
)
from teleflm.testing import tiny_config

BASE_WIDTH = 64  # the proxy's width; mup_scale_factor = hidden_size / BASE_WIDTH
LAYERS = 2
HP = MupHyperParams(lr=1e-3, matrix_lr=4e-3, std=0.02, matrix_std=0.05, weight_decay=0.1)


def model_of_width(width: int, use_mup: bool = True) -> TeleFLMForCausalLM:
    config = tiny_config(
        vocab_size=512,
        hidden_size=width,
        intermediate_size=width * 5 // 2,
        num_hidden_layers=LAYERS,
        num_attention_heads=width // 32,  # head_dim fixed at 32 while heads grow with width
        num_key_value_heads=width // 32,
        use_mup=use_mup,
        mup_scale_factor=width / BASE_WIDTH,
    )
    torch.manual_seed(0)
    model = TeleFLMForCausalLM(config)
    init_weights(model, config, HP)
    return model


def expected_std(name: str, width_mult: float) -> float | None:
    """The rule written out by hand, independently of teleflm.mup.init_std."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return HP.std
    std = HP.matrix_std / math.sqrt(width_mult)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * LAYERS)
    return std


def test_parameter_classes():
    model = model_of_width(128)
    classes = {name: param_class(name) for name, _ in model.named_parameters()}
    assert classes["model.embed_tokens.weight"] == EMBEDDING
    assert classes["lm_head.weight"] == READOUT
    assert classes["model.norm.weight"] == VECTOR
    assert classes["model.layers.1.input_layernorm.weight"] == VECTOR
    matrices = sorted(n for n, c in classes.items() if c == MATRIX)
    assert len(matrices) == 7 * LAYERS
    assert all(
        n.split(".")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        for n in matrices
    )
    # Wrappers' prefixes (FSDP, compile) do not change the class.
    assert param_class("_orig_mod.model.layers.0.mlp.up_proj.weight") == MATRIX


@pytest.mark.parametrize("width", [128, 256])
def test_init_statistics_per_class(width):
    model = model_of_width(width)
    width_mult = width / BASE_WIDTH
    for name, p in model.named_parameters():
        std = expected_std(name, width_mult)
        if std is None:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.mean().item()) < 4 * std / math.sqrt(p.numel()), name
            assert p.std().item() == pytest.approx(std, rel=0.05), name


def test_matrix_init_shrinks_with_width_and_the_rest_does_not():
    narrow, wide = model_of_width(128), model_of_width(256)

    def std(model, name):
        return dict(model.named_parameters())[name].std().item()

    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert std(narrow, name) / std(wide, name) == pytest.approx(math.sqrt(2), rel=0.05)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert std(narrow, name) == pytest.approx(std(wide, name), rel=0.05)


def test_standard_parametrization_ignores_width():
    model = model_of_width(256, use_mup=False)
    q = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert q.std().item() == pytest.approx(HP.matrix_std, rel=0.05)
    assert {g["mup_class"]: g["lr"] for g in param_groups(model, model.config, HP)}[MATRIX] == HP.matrix_lr


def test_depth_factor_keeps_every_init_std_and_learning_rate_of_the_proxy_depth():
    """CompleteP (alpha = 1): a model 4x deeper than its proxy (mup_depth_factor 4) draws every
    parameter with the proxy's std (residual outputs / sqrt(2 x proxy layers), not 2 x its own) and
    gets the proxy's learning rates; without the factor the residual outputs shrink by sqrt(4)."""
    from teleflm.mup import init_std

    proxy = tiny_config(num_hidden_layers=2, use_mup=True, mup_scale_factor=2.0)
    deep = tiny_config(num_hidden_layers=8, use_mup=True, mup_scale_factor=2.0, mup_depth_factor=4.0)
    unscaled = tiny_config(num_hidden_layers=8, use_mup=True, mup_scale_factor=2.0)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert init_std(name, deep, HP) == pytest.approx(init_std(name, proxy, HP))
    down = "model.layers.1.mlp.down_proj.weight"
    assert init_std(down, unscaled, HP) == pytest.approx(init_std(down, proxy, HP) / 2)
    with torch.device("meta"):
        rates = [
            {g["mup_class"]: g["lr"] for g in param_groups(TeleFLMForCausalLM(c), c, HP)}
            for c in (proxy, deep)
        ]
    assert rates[0] == rates[1]


@pytest.mark.parametrize("width", [128, 256])
def test_optimizer_groups(width):
    model = model_of_width(width)
    width_mult = width / BASE_WIDTH
    groups = {g["mup_class"]: g for g in param_groups(model, model.config, HP)}
    expected = {
        MATRIX: (HP.matrix_lr / width_mult, HP.weight_decay * width_mult),
        EMBEDDING: (HP.lr, HP.weight_decay),
        READOUT: (HP.lr, HP.weight_decay),
        VECTOR: (HP.lr, 0.0),
    }
    assert set(groups) == set(expected)
    for kind, (lr, weight_decay) in expected.items():
        assert groups[kind]["lr"] == pytest.approx(lr), kind
        assert groups[kind]["weight_decay"] == pytest.approx(weight_decay), kind
    assert all(g["base_lr"] == g["lr"] for g in groups.values())
    # Every trainable parameter in exactly one group, the group of its class.
    grouped = {id(p): k for k, g in groups.items() for p in g["params"]}
    assert len(grouped) == sum(len(g["params"]) for g in groups.values())
    assert grouped == {id(p): param_class(n) for n, p in model.named_parameters()}


def test_adamw_moves_each_class_by_its_learning_rate():
    """Adam's first step moves every weight by about lr (|m / sqrt(v)| = 1): the groups' rates are
    the rates the optimizer really applies."""
    model = model_of_width(256)
    groups = param_groups(model, model.config, MupHyperParams(lr=1e-3, matrix_lr=4e-3, weight_decay=0.0))
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    optimizer = torch.optim.AdamW(groups, eps=1e-12)
    ids = torch.randint(0, 512, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for group in optimizer.param_groups:
        moved = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in group["params"]])
        moved = moved[moved > 0]  # embedding rows of absent tokens get no gradient
        assert moved.median().item() == pytest.approx(group["lr"], rel=0.02), group["mup_class"]
    assert {g["mup_class"]: g["lr"] for g in optimizer.param_groups}[MATRIX] == pytest.approx(4e-3 / 4)


def test_initial_values_norms_one_biases_zero_and_every_layout_draws_the_same():
    """Parameters without an init std: norm weights 1, biases 0 (biases were set to 1)."""
    import torch

    from teleflm.model import TeleFLMForCausalLM
    from teleflm.mup import MupHyperParams, init_weights, initial_value
    from teleflm.parallel.mesh import ParallelDims
    from teleflm.parallel.parallelize import parallelize
    from teleflm.testing import tiny_config
    from teleflm.train.config import ParallelSection

    config = tiny_config(attention_bias=True)
    hp = MupHyperParams()
    with torch.device("meta"):
        model = TeleFLMForCausalLM(config)
    model = parallelize(model, None, ParallelDims(), ParallelSection(mixed_precision="fp32"))
    model.to_empty(device="cpu")
    init_weights(model, config, hp, seed=3)
    params = dict(model.named_parameters())
    biases = [n for n in params if n.endswith(".bias")]
    assert len(biases) == 4 * config.num_hidden_layers
    assert all(not params[n].any() for n in biases)
    assert all((params[n] == 1).all() for n in params if n.endswith("norm.weight"))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(params[q], initial_value(q, params[q].shape, config, hp, seed=3))


def test_any_rows_of_an_initial_value_are_those_rows_of_the_whole():
    """A shard's rows drawn alone equal the same rows of the whole tensor: init and growth draw only
    their own shard on each rank."""
    import torch

    from teleflm.mup import MupHyperParams, initial_value
    from teleflm.testing import tiny_config

    config, hp = tiny_config(), MupHyperParams()
    name = "model.layers.1.mlp.down_proj.weight"
    whole = initial_value(name, (64, 160), config, hp, seed=5)
    assert torch.equal(initial_value(name, (64, 160), config, hp, seed=5, rows=range(17, 40)), whole[17:40])
    assert whole.std().item() == pytest.approx(hp.matrix_std / (2 * 2) ** 0.5, rel=0.05)  # / sqrt(2 L)
    assert not torch.equal(initial_value(name, (64, 160), config, hp, seed=6), whole)

import pytest

from teleflm.model import TeleFLMConfig


def test_hidden_size_not_divisible_by_heads():
    with pytest.raises(
        ValueError, match=r"hidden_size \(100\) is not divisible by num_attention_heads \(8\)"
    ):
        TeleFLMConfig(hidden_size=100, num_attention_heads=8)


def test_kv_heads_not_dividing_heads():
    with pytest.raises(
        ValueError, match=r"num_key_value_heads \(3\) does not divide num_attention_heads \(8\)"
    ):
        TeleFLMConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=3)


def test_official_field_names_and_defaults():
    config = TeleFLMConfig(hidden_size=64, num_attention_heads=4)
    fields = config.to_dict()
    for name in (
        "use_mup",
        "mup_scale_factor",
        "output_mult",
        "input_mult",
        "num_key_value_heads",
        "rope_theta",
    ):
        assert name in fields
    assert config.model_type == "TeleFLM"
    assert (config.use_mup, config.mup_scale_factor, config.output_mult, config.input_mult) == (
        False,
        1.0,
        1.0,
        1.0,
    )
    assert config.num_key_value_heads == 4 and config.head_dim == 16
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)

"""Exports stay in the layout vLLM's TeleFLMForCausalLM loads: the architecture name, the config
fields and the weight names of the official checkpoints (Tele-FLM 52B's `config.json` and weight
index, written out here as the reference: the test must not read our own list of them)."""

import json

from safetensors import safe_open

from teleflm.model.io import export_hf
from tests.model.reference import MUP, random_model

# The fields of the released config.json (Llama's plus the four muP fields).
OFFICIAL_CONFIG_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pretraining_tp", "tie_word_embeddings", "rope_theta", "rope_scaling", "attention_bias",
    "attention_dropout", "use_mup", "mup_scale_factor", "output_mult", "input_mult",
}  # fmt: skip
# The released weight names; N is the layer index.
OFFICIAL_WEIGHT_NAMES = [
    "model.embed_tokens.weight",
    "model.layers.N.self_attn.q_proj.weight",
    "model.layers.N.self_attn.k_proj.weight",
    "model.layers.N.self_attn.v_proj.weight",
    "model.layers.N.self_attn.o_proj.weight",
    "model.layers.N.mlp.gate_proj.weight",
    "model.layers.N.mlp.up_proj.weight",
    "model.layers.N.mlp.down_proj.weight",
    "model.layers.N.input_layernorm.weight",
    "model.layers.N.post_attention_layernorm.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def test_export_matches_the_official_names(tmp_path):
    model = random_model(**MUP)
    folder = export_hf(model, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "TeleFLM" and config["architectures"] == ["TeleFLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_teleflm.TeleFLMForCausalLM"
    # TeleFLMConfig leaves out `rope_scaling` when it is null (transformers warns about the mere
    # field); readers, vLLM included, take an absent field as null. Every other field is written.
    missing = OFFICIAL_CONFIG_FIELDS - set(config)
    assert missing <= {"rope_scaling"} and getattr(model.config, "rope_scaling", None) is None, missing
    for field in OFFICIAL_CONFIG_FIELDS - missing:
        assert config[field] == getattr(model.config, field), field
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    layers = range(model.config.num_hidden_layers)
    assert names == {n.replace(".N.", f".{i}.") for n in OFFICIAL_WEIGHT_NAMES for i in layers}

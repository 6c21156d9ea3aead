"""Exports stay in the layout vLLM's TeleFLMForCausalLM loads: the architecture name, the config
fields and the weight names that SPEC section 1 lists for the official checkpoints, read from the
SPEC itself."""

import json
import re

import pytest
from safetensors import safe_open

from teleflm.model.io import export_hf
from tests.conftest import REPO
from tests.model.reference import MUP, random_model

SPEC = REPO.parent / "shared" / "SPEC.md"


def spec_section_1() -> str:
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is absent (tests expect ../shared beside the repo)")
    text = SPEC.read_text(encoding="utf-8")
    return text[text.index("## 1.") : text.index("## 2.")]


def bullet(section: str, start: str) -> str:
    """The text of the bullet that begins with `start`, up to the next bullet or blank line."""
    match = re.search(rf"^- {re.escape(start)}.*?(?=^- |^$|\Z)", section, re.M | re.S)
    assert match, f"SPEC section 1 has no bullet starting {start!r}"
    return match.group(0)


def spec_config_fields(section: str) -> set[str]:
    """`vocab_size, hidden_size, ...` and `use_mup (False), ...` of the config bullet."""
    spans = re.findall(r"`([^`]+)`", bullet(section, "Config class"))
    fields = {re.sub(r"\s*\(.*\)$", "", name.strip()) for span in spans[2:] for name in span.split(",")}
    assert {"vocab_size", "rope_scaling", "use_mup", "input_mult"} <= fields  # the parse found the lists
    return fields


def spec_weight_names(section: str, num_layers: int) -> set[str]:
    """`model.layers.N.self_attn.{q,k,v,o}_proj.weight` and the like, expanded for every layer."""
    names = set()
    for pattern in re.findall(r"`([^`]+)`", bullet(section, "State-dict keys")):
        alternatives = re.search(r"\{([^}]+)\}", pattern)
        for choice in alternatives.group(1).split(",") if alternatives else [None]:
            name = pattern.replace(alternatives.group(0), choice) if choice else pattern
            names |= {name.replace(".N.", f".{layer}.") for layer in range(num_layers)}
    return names


def test_export_matches_the_official_names(tmp_path):
    section = spec_section_1()
    model = random_model(**MUP)
    folder = export_hf(model, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "TeleFLM" and config["architectures"] == ["TeleFLMForCausalLM"]
    fields = spec_config_fields(section)
    # TeleFLMConfig leaves out `rope_scaling` when it is null (transformers warns about the mere
    # field); readers, vLLM included, take an absent field as null. Every other field is written.
    missing = fields - set(config)
    assert missing <= {"rope_scaling"} and getattr(model.config, "rope_scaling", None) is None, missing
    for field in fields - missing:
        assert config[field] == getattr(model.config, field), field
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == spec_weight_names(section, model.config.num_hidden_layers)

"""Configs are refused before any work when wrong, and the shipped ones describe the real models."""

from pathlib import Path

import pytest
import torch

from teleflm.config import ConfigError
from teleflm.model import TeleFLMForCausalLM
from teleflm.train.config import load_config, validate

CONFIGS = Path(__file__).parents[2] / "configs"
NO_DATA = ["data.shards=''", "data.tokenizer=''"]  # shipped configs point at data made later


def parameter_count(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in TeleFLMForCausalLM(cfg.model_config()).parameters())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_config(path, NO_DATA)
    p = cfg.parallel
    world = p.dp_replicate * max(p.dp_shard, 1) * p.tp * p.pp
    validate(cfg, path.name, world_size=world)  # raises ConfigError naming the field
    assert cfg.total_steps() >= 1


def test_52b_matches_the_card():
    cfg = load_config(CONFIGS / "teleflm-52b.toml", NO_DATA)
    assert parameter_count(cfg) == pytest.approx(52.85e9, rel=0.005)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp_shard) == (4, 2, 112)
    assert cfg.batch.global_batch_tokens == 1344 * 4096
    mc = cfg.model_config()
    assert mc.output_mult / mc.mup_scale_factor == pytest.approx(1 / 32)  # the card's logit scale
    assert mc.hidden_size // mc.num_attention_heads == 128


def test_proxy_differs_from_52b_only_in_width():
    proxy = load_config(CONFIGS / "teleflm-mup-proxy.toml", NO_DATA).model
    big = load_config(CONFIGS / "teleflm-52b.toml", NO_DATA).model
    width_fields = {
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "mup_scale_factor",
    }
    assert {k for k in big if big[k] != proxy.get(k)} == width_fields
    assert big["hidden_size"] / proxy["hidden_size"] == big["mup_scale_factor"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


BASE = """
[model]
vocab_size = 128
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
max_position_embeddings = 64
[data]
context_length = 32
[batch]
global_batch_tokens = 256
micro_batch_size = 2
[schedule]
total_tokens = 2560
"""


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml\.optim: unknown key\(s\) \['gradclip'\]"):
        load_config(write(tmp_path, BASE + "[optim]\ngradclip = 1.0\n"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['optimizer'\]"):
        load_config(write(tmp_path, BASE + "[optimizer]\nx = 1\n"))


def test_toml_syntax_error_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml: not valid TOML: .*\(at line 9, column 6\)"):
        load_config(write(tmp_path, BASE.replace("[data]", "[data")))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"batch\.micro_batch_size: expected int"):
        load_config(write(tmp_path, BASE), ["batch.micro_batch_size='two'"])


def test_overrides_apply(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["parallel.tp=2", "optim.grad_clip=0.5", "out=runs/x"])
    assert (cfg.parallel.tp, cfg.optim.grad_clip, cfg.out) == (2, 0.5, "runs/x")


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tp=3"], None, r"parallel\.tp=3 must divide num_attention_heads"),
        (["parallel.pp=3"], None, r"parallel\.pp=3 must divide num_hidden_layers"),
        (["model.num_key_value_heads=3"], None, r"num_key_value_heads \(3\) does not divide"),
        (["model.hidden_size=66"], None, r"hidden_size \(66\) is not divisible"),
        (["batch.global_batch_tokens=100"], None, r"not a multiple of data\.context_length"),
        (["batch.micro_batch_size=3"], 1, r"not divisible by micro_batch_size x context_length x dp"),
        (["parallel.dp_shard=2", "parallel.tp=2"], 2, r"does not equal the world size 2"),
        (["data.shards='nowhere/shards'"], None, r"data\.shards nowhere/shards does not exist"),
        (["data.context_length=128"], None, r"must be in 1\.\.max_position_embeddings"),
        (
            ["logging.eval_stride=33"],
            None,
            r"logging\.eval_stride \(33\) exceeds data\.context_length \(32\)",
        ),
    ],
)
def test_bad_configs_are_refused(tmp_path, overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        cfg = load_config(write(tmp_path, BASE), overrides)
        validate(cfg, "c.toml", world_size=world)


def test_config_reference_is_current():
    from teleflm.train.config_reference import reference

    path = Path(__file__).parents[2] / "docs" / "config.md"
    assert path.read_text() == reference(), (
        "docs/config.md is stale: python -m teleflm.train.config_reference > docs/config.md"
    )


def test_model_table_typo_is_named(tmp_path):
    """A typo in [model] would otherwise train the default shape (32 layers) for weeks."""
    typo = BASE.replace("num_hidden_layers = 2", "num_hiden_layers = 2")
    with pytest.raises(ConfigError, match=r"c\.toml\.model: unknown key\(s\) \['num_hiden_layers'\]"):
        load_config(write(tmp_path, typo))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['hiden_size'\]"):
        load_config(write(tmp_path, BASE), ["model.hiden_size=128"])
    with pytest.raises(ConfigError, match=r"c\.toml\.model\.hidden_size: expected int, got '64'"):
        load_config(write(tmp_path, BASE), ["model.hidden_size='64'"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("mup.lr=0.0", r"mup\.lr = 0\.0 is out of range: it must be > 0"),
        ("mup.matrix_lr=-1e-3", r"mup\.matrix_lr = -0\.001 is out of range: it must be > 0"),
        ("batch.micro_batch_size=0", r"batch\.micro_batch_size = 0 is out of range: it must be >= 1"),
        ("schedule.warmup_steps=-5", r"schedule\.warmup_steps = -5 is out of range: it must be >= 0"),
        ("optim.beta2=1.0", r"optim\.beta2 = 1\.0 is out of range: it must be >= 0 and < 1"),
        ("parallel.dp_shard=0", r"parallel\.dp_shard = 0 is out of range: it must be >= 1 or -1"),
        ("checkpoint.keep_last=0", r"checkpoint\.keep_last = 0 is out of range"),
        ("stability.window=1", r"stability\.window = 1 is out of range: it must be >= 2"),
        ("model.num_attention_heads=0", r"model\.num_attention_heads = 0 is out of range: it must be >= 1"),
        ("model.rms_norm_eps=0", r"model\.rms_norm_eps = 0\.0 is out of range: it must be > 0"),
        ("data.mixture=[{name='en', proportion=-1.0}]", r"data\.mixture\[0\]\.proportion = -1\.0"),
    ],
)
def test_values_out_of_range_are_refused(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE), [override])


def config_tables():
    """Every dataclass a config is built from (pre-training and fine-tuning)."""
    import dataclasses
    import typing

    from teleflm.sft.config import SFTSection
    from teleflm.train.config import TrainConfig

    found, todo = [], [TrainConfig, SFTSection]
    while todo:
        cls = todo.pop()
        found.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for inner in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(inner) and inner not in found + todo:
                    todo.append(inner)
    return found


def test_every_numeric_key_has_a_range():
    """A new numeric key cannot slip in without a rule; defaults lie inside their ranges (0 tokens
    means "not set" for the two keys a run must set)."""
    import dataclasses
    import typing

    from teleflm.train.config import MODEL_RANGES, model_fields

    unset = {"total_tokens", "at_tokens"}
    for cls in config_tables():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                assert f.name in cls.RANGES, f"{cls.__name__}.{f.name} has no range"
                if f.default is not dataclasses.MISSING and f.name not in unset:
                    assert f.default in cls.RANGES[f.name], f"{cls.__name__}.{f.name}"
    from teleflm.model import TeleFLMConfig

    defaults = TeleFLMConfig()
    for name, hint in model_fields().items():
        if hint in (int, float):
            assert name in MODEL_RANGES, f"[model] {name} has no range"
            value = getattr(defaults, name)
            assert value is None or value in MODEL_RANGES[name], name


def test_refused_config_leaves_no_run_folder(tmp_path, capsys):
    """Before the fix, mup.lr = 0 created the run folder and died in set_lr with ZeroDivisionError."""
    from teleflm.cli.main import main

    out = tmp_path / "run"
    config = write(tmp_path, f'out = "{out}"\n' + BASE)
    for override in ("mup.lr=0.0", "batch.micro_batch_size=0", "model.hiden_size=128"):
        assert main(["pretrain", "--config", str(config), "--set", override]) == 2
        assert override.split("=")[0].split(".")[-1] in capsys.readouterr().err
        assert not out.exists()

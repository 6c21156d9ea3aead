"""Export to a Hugging Face folder, load exports and the official layout, refuse bad input clearly."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

import teleflm.model.io as io
from teleflm.data.tokenizer import real_vocab_size
from teleflm.model.io import (
    AUTO_MAP,
    OFFICIAL_CONFIG_FIELDS,
    CheckpointError,
    export_hf,
    load_pretrained,
)
from teleflm.testing import write_official_layout
from tests.model.reference import MUP, llama_twin, logit_scale, random_model
from tests.model.tiny_tokenizers import SENTENCEPIECE_VOCAB, train_byte_level_bpe

PADDED_VOCAB = 2048  # the embedding is padded past the tokenizer's 2000 entries, as in Tele-FLM
IDS = torch.arange(4, 60).reshape(2, 28)
TEXTS = ["In the beginning God created the heaven and the earth.", "床前明月光，疑是地上霜。", "x = 12345"]


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def leftovers(folder: Path) -> list[str]:
    """Staging or moved-aside folders an export may leave next to its target."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def official(tmp_path, sentencepiece_dir):
    """A tiny checkpoint in the released layout, with the 52B checkpoint's muP multipliers."""
    model = random_model(
        vocab_size=PADDED_VOCAB, use_mup=True, input_mult=1.0, output_mult=0.5, mup_scale_factor=16.0
    )
    folder = write_official_layout(model, sentencepiece_dir / "tokenizer.model", tmp_path / "official")
    return model, folder


# ----- round trips -----


def test_export_then_load_round_trip(tmp_path, sentencepiece_dir):
    model = random_model(vocab_size=PADDED_VOCAB, **MUP)
    out = export_hf(model, tmp_path / "export", tokenizer_dir=sentencepiece_dir, max_shard_size="200KB")

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    assert config["architectures"] == ["TeleFLMForCausalLM"]
    assert config["model_type"] == "TeleFLM"
    assert {k: config[k] for k in MUP} == MUP
    for source in ("configuration_teleflm.py", "modeling_teleflm.py"):
        assert (out / source).read_bytes() == (Path(io.__file__).parent / source).read_bytes()
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 3)
    # Sharded past 200KB (the embedding alone is 512KB), every tensor listed once in the index.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert set(index["weight_map"]) == set(model.state_dict())
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    assert leftovers(tmp_path) == []

    loaded, tokenizer = load_pretrained(out, device="cpu")
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.dtype == torch.float32 and not loaded.training
    assert len(tokenizer) == real_vocab_size(out) == SENTENCEPIECE_VOCAB < loaded.config.vocab_size


def test_export_folds_the_depth_factor_into_the_weights(tmp_path):
    """An export of a model with CompleteP's branch multiplier computes the same logits with the
    factor folded into o_proj and down_proj and set to 1, so readers that do not know the field
    (vLLM's Tele-FLM, the released model files) run it right."""
    model = random_model(**MUP, mup_depth_factor=4.0)
    out = export_hf(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["mup_depth_factor"] == 1.0
    weights = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(weights[name], model.state_dict()[name] / 4.0)
    loaded, _ = load_pretrained(out, device="cpu")
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5
    assert model.config.mup_depth_factor == 4.0  # the model in memory is left as it was


def test_export_in_bf16(tmp_path):
    model = random_model()
    out = export_hf(model, tmp_path / "export", dtype="bf16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded, tokenizer = load_pretrained(out, dtype=None, device="cpu")  # None: as config.json says
    assert tokenizer is None
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.bfloat16())


def test_official_layout_loads_and_matches_llama(official):
    model, folder = official
    names = {p.name for p in folder.iterdir()}
    assert {"pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"} <= names
    assert not any(name.endswith(".safetensors") for name in names)
    config = json.loads((folder / "config.json").read_text())
    assert set(config) <= set(OFFICIAL_CONFIG_FIELDS) | {
        "architectures",
        "auto_map",
        "model_type",
        "torch_dtype",
    }

    loaded, _ = load_pretrained(folder, device="cpu")
    reference = llama_twin(model)
    # Logit scale 0.5 / 16 = 1/32, as for Tele-FLM 52B.
    diff = (logits(loaded) - logits(reference) * logit_scale(model)).abs().max().item()
    assert logit_scale(model) == 1 / 32 and diff <= 1e-5


def test_official_sentencepiece_tokenizer(official, sentencepiece_dir):
    """The slow SentencePiece model loads offline as transformers' LlamaTokenizer: same ids as
    sentencepiece itself (byte fallback included), no BOS added, specials 0..3, padded vocab seen."""
    _, folder = official
    _, tokenizer = load_pretrained(folder, device="cpu")
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text)
        assert tokenizer.decode(ids) == text
    assert any(sp.id_to_piece(i).startswith("<0x") for text in TEXTS for i in sp.encode(text))
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<pad>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    assert real_vocab_size(tokenizer) == real_vocab_size(folder) == SENTENCEPIECE_VOCAB


def test_official_layout_reexports(official, tmp_path):
    model, folder = official
    loaded, _ = load_pretrained(folder, device="cpu")
    out = export_hf(loaded, tmp_path / "export", tokenizer_dir=folder)
    again, tokenizer = load_pretrained(out, device="cpu")
    assert torch.equal(logits(again), logits(model))
    assert tokenizer(TEXTS[0])["input_ids"] == load_pretrained(folder, device="cpu")[1](TEXTS[0])["input_ids"]


def test_byte_level_bpe_tokenizer_exports_for_auto_tokenizer(tmp_path):
    """A bare `tokenizers` tokenizer.json (no tokenizer_config.json) becomes a folder that
    AutoTokenizer loads by class name, with the same ids."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    source = train_byte_level_bpe(tmp_path / "bpe")
    out = export_hf(random_model(vocab_size=512), tmp_path / "export", tokenizer_dir=source)
    assert (
        json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    auto = AutoTokenizer.from_pretrained(out, config=io.load_config(out))  # config given: no remote code
    raw = Tokenizer.from_file(str(source / "tokenizer.json"))
    text = "And God said, Let there be light: 北京"
    assert auto(text)["input_ids"] == raw.encode(text).ids
    assert real_vocab_size(out) == raw.get_vocab_size() == 500


def test_loading_runs_no_code_from_the_folder(official, tmp_path):
    """Model and tokenizer code shipped in a folder is never imported by load_pretrained."""
    _, folder = official
    sentinel = tmp_path / "code-ran"
    trap = f"open({str(sentinel)!r}, 'w').write('ran')\n"
    for name in ("configuration_teleflm.py", "modeling_teleflm.py", "tokenization_teleflm.py"):
        (folder / name).write_text(trap)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_teleflm.TeleFLMTokenizer", None]}
    tokenizer_config["tokenizer_class"] = "TeleFLMTokenizer"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    model, tokenizer = load_pretrained(folder, device="cpu")
    assert not sentinel.exists()
    assert type(model).__module__ == "teleflm.model.modeling_teleflm"
    assert type(tokenizer).__name__ == "LlamaTokenizer"


# ----- bad input: a clear error naming the culprit -----


def rewrite_shard(folder: Path, shard: str, edit) -> None:
    path = folder / shard
    tensors = torch.load(path, weights_only=True)
    edit(tensors)
    torch.save(tensors, path)


def test_missing_tensor(official):
    _, folder = official
    rewrite_shard(folder, "pytorch_model-00002-of-00002.bin", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'lm_head.weight'.*pytorch_model-00002-of-00002\.bin"
    ):
        load_pretrained(folder, device="cpu")


def test_mis_shaped_tensor(official):
    _, folder = official
    name = "model.layers.0.self_attn.k_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:16]

    rewrite_shard(folder, "pytorch_model-00001-of-00002.bin", shrink)
    with pytest.raises(
        CheckpointError,
        match=rf"pytorch_model-00001-of-00002\.bin: tensor '{name}' has shape \(16, 64\), the config needs \(32, 64\)",
    ):
        load_pretrained(folder, device="cpu")


def test_unexpected_tensor(official):
    _, folder = official
    name = "model.layers.7.mlp.up_proj.weight"
    rewrite_shard(folder, "pytorch_model-00002-of-00002.bin", lambda t: t.update({name: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=rf"00002-of-00002\.bin: unexpected tensor '{name}'"):
        load_pretrained(folder, device="cpu")


def test_tensor_in_two_shards(official):
    _, folder = official
    first = torch.load(folder / "pytorch_model-00001-of-00002.bin", weights_only=True)
    name = next(iter(first))
    rewrite_shard(folder, "pytorch_model-00002-of-00002.bin", lambda t: t.update({name: first[name]}))
    with pytest.raises(CheckpointError, match=rf"00002-of-00002\.bin: tensor '{name}' was already read"):
        load_pretrained(folder, device="cpu")


def test_saved_rope_buffers_of_older_checkpoints_are_skipped(official):
    """Older Llama code saved each layer's rotary inv_freq with the weights; they are recomputed."""
    model, folder = official
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_shard(folder, "pytorch_model-00001-of-00002.bin", lambda t: t.update({name: torch.zeros(8)}))
    loaded, _ = load_pretrained(folder, device="cpu")
    assert torch.equal(logits(loaded), logits(model))


def test_index_names_a_missing_shard(official):
    _, folder = official
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"pytorch_model\.bin\.index\.json: names shard pytorch_model-00002-of-00002\.bin, which is missing",
    ):
        load_pretrained(folder, device="cpu")


class Payload:
    """Unpickling this would run code (it writes the path it carries)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def test_pickle_with_code_is_refused(official, tmp_path):
    _, folder = official
    sentinel = tmp_path / "unpickled"
    rewrite_shard(folder, "pytorch_model-00001-of-00002.bin", lambda t: t.update(extra=Payload(sentinel)))
    with pytest.raises(
        CheckpointError,
        match=r"pytorch_model-00001-of-00002\.bin: refused to unpickle, it holds objects other than tensors",
    ):
        load_pretrained(folder, device="cpu")
    assert not sentinel.exists()


def test_pickle_with_plain_objects_is_refused(official):
    _, folder = official
    rewrite_shard(folder, "pytorch_model-00002-of-00002.bin", lambda t: t.update(step=1000))
    with pytest.raises(CheckpointError, match=r"00002-of-00002\.bin: entry 'step' is a int, not a tensor"):
        load_pretrained(folder, device="cpu")


def test_config_with_bad_heads_names_the_file(official):
    _, folder = official
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match=r"config\.json: .*num_key_value_heads \(3\) does not divide"):
        load_pretrained(folder, device="cpu")


def test_config_of_another_model_type(official):
    _, folder = official
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'llama', expected 'TeleFLM'"):
        load_pretrained(folder, device="cpu")


def test_tokenizer_larger_than_the_vocabulary(tmp_path, sentencepiece_dir):
    out = tmp_path / "export"
    with pytest.raises(
        CheckpointError, match=r"the tokenizer has 2000 entries, more than the model's vocab_size \(128\)"
    ):
        export_hf(random_model(), out, tokenizer_dir=sentencepiece_dir)
    assert not out.exists() and leftovers(tmp_path) == []


def test_non_empty_target_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=rf"export target {out} exists and is not empty"):
        export_hf(random_model(), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []

    export_hf(random_model(), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_empty_target_folder_is_used(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    export_hf(random_model(), out)
    assert (out / "config.json").is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_export_gets_the_umask_like_any_other_output(tmp_path, sentencepiece_dir, umask):
    """Before, the folder was 0700 (tempfile.mkdtemp) and model.safetensors 0600 (safetensors)."""
    import os
    import stat

    previous = os.umask(umask)
    try:
        out = export_hf(random_model(vocab_size=2048), tmp_path / "export", tokenizer_dir=sentencepiece_dir)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_config", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(random_model(), tmp_path / "fresh")
    assert list(tmp_path.iterdir()) == []

    # Overwriting: the old export survives a failed new one.
    monkeypatch.undo()
    old = export_hf(random_model(seed=1), tmp_path / "export")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    monkeypatch.setattr(io, "write_config", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(random_model(seed=2), old, overwrite=True)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_transformers_from_pretrained_initialises_rope(tmp_path):
    """transformers builds models on the meta device and leaves non-persistent buffers empty; our
    _init_weights must recompute RoPE's frequencies (it once did not, and generation was garbage)."""
    from teleflm.model import TeleFLMForCausalLM

    model = random_model()
    export = export_hf(model, tmp_path / "export")
    loaded = TeleFLMForCausalLM.from_pretrained(export).eval()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(logits(loaded), logits(model))

"""`teleflm generate`: streamed continuation of a prompt, greedy or sampled."""

import torch

from teleflm.cli.main import main
from teleflm.model import TeleFLMForCausalLM
from teleflm.model.io import export_hf, load_pretrained
from tests.model.reference import random_model

PROMPT = "And God said"


def generate(folder, *extra) -> str:
    return main(["generate", "--model", str(folder), "--prompt", PROMPT, "--dtype", "fp32", *extra])


def test_greedy_streams_what_generate_returns(tmp_path, sentencepiece_dir, capsys):
    folder = export_hf(random_model(vocab_size=2048), tmp_path / "export", tokenizer_dir=sentencepiece_dir)
    assert generate(folder, "--max-new-tokens", "24") == 0
    streamed = capsys.readouterr().out

    model, tokenizer = load_pretrained(folder, device="cpu")
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            **inputs,
            max_new_tokens=24,
            do_sample=False,
            repetition_penalty=1.03,
            suppress_tokens=list(range(2000, 2048)),
        )
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 24
    assert streamed.strip() == tokenizer.decode(ids[0], skip_special_tokens=True).strip()
    assert streamed.startswith(PROMPT) and len(streamed.strip()) > len(PROMPT)


def test_padded_ids_are_never_generated(tmp_path, sentencepiece_dir, capsys):
    """A model rigged to prefer the embedding's padding rows: plain generate emits them, the
    command does not."""
    model = random_model(vocab_size=2048)
    with torch.no_grad():
        # Every token embeds to the same vector and the blocks add nothing: the final hidden state
        # is one constant direction h, and the padding rows of the readout point along it.
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight[5].expand(2048, -1))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        h = model.model.norm(model.model.embed_tokens.weight[:1])[0]
        model.lm_head.weight[2000:] = 10 * h / h.norm()
    folder = export_hf(model, tmp_path / "export", tokenizer_dir=sentencepiece_dir)
    _, tokenizer = load_pretrained(folder, device="cpu")
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        unmasked = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert (unmasked[0, inputs["input_ids"].shape[1] :] >= 2000).all()

    assert generate(folder, "--max-new-tokens", "4", "--repetition-penalty", "1.0") == 0
    streamed = capsys.readouterr().out.strip()
    continuation = tokenizer(streamed.removeprefix(PROMPT))["input_ids"]
    assert len(continuation) > 0 and max(continuation) < 2000


def test_sampling_follows_the_seed(tmp_path, sentencepiece_dir, capsys):
    folder = export_hf(random_model(vocab_size=2048), tmp_path / "export", tokenizer_dir=sentencepiece_dir)
    outputs = []
    for seed in ("1", "1", "2"):
        assert (
            generate(
                folder, "--temperature", "1.0", "--top-p", "0.95", "--seed", seed, "--max-new-tokens", "30"
            )
            == 0
        )
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] != outputs[2]


def test_folder_without_tokenizer(tmp_path, capsys):
    folder = export_hf(random_model(), tmp_path / "export")
    assert generate(folder) == 2
    assert f"{folder}: no tokenizer in the model folder (pass --tokenizer DIR)" in capsys.readouterr().err


def test_generation_stays_inside_the_context(tmp_path, sentencepiece_dir, capsys, monkeypatch):
    """On a 128-position model: --max-new-tokens past the context is cut (with a note), a prompt
    longer than the context and an empty prompt are refused. Before, the first two ran past the
    positions (garbage) and the empty prompt crashed in a reshape."""
    model = random_model(vocab_size=2048, max_position_embeddings=128)
    folder = export_hf(model, tmp_path / "export", tokenizer_dir=sentencepiece_dir)
    _, tokenizer = load_pretrained(folder, device="cpu")
    prompt_tokens = len(tokenizer(PROMPT)["input_ids"])
    lengths, generate_ids = [], TeleFLMForCausalLM.generate

    def measured(self, *args, **kwargs):
        ids = generate_ids(self, *args, **kwargs)
        lengths.append(ids.shape[1])
        return ids

    monkeypatch.setattr(TeleFLMForCausalLM, "generate", measured)
    assert generate(folder, "--max-new-tokens", "1000") == 0
    err = capsys.readouterr().err
    assert f"at most {128 - prompt_tokens} new tokens" in err
    assert "--max-new-tokens 1000 does not fit the model's context of 128 tokens" in err
    assert lengths and lengths[0] <= 128

    base = ["generate", "--model", str(folder), "--dtype", "fp32"]
    assert main([*base, "--prompt", PROMPT * 60]) == 2
    assert "the model's context is 128 tokens, so nothing can follow it" in capsys.readouterr().err
    assert main([*base, "--prompt", ""]) == 2
    assert "the prompt is empty (no tokens)" in capsys.readouterr().err

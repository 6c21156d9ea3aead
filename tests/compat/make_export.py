"""Write the export that scripts/compat.sh and scripts/vllm_check.sh check elsewhere: a tiny muP
Tele-FLM with the 52B checkpoint's multipliers and grouped-query attention (head_dim 64, a size vLLM's
CPU attention takes), its byte-level BPE tokenizer (trained on the embedded sample) and a vocabulary
padded past the tokenizer, exported by `teleflm.model.io.export_hf`; and `greedy.json`, teleflm's own
greedy continuations of a few prompts, for other engines to match.

    python -m tests.compat.make_export OUT
"""

import json
import sys
from pathlib import Path

import torch

from teleflm.data.tokenizer import train_tokenizer
from teleflm.model.io import export_hf, load_pretrained
from tests.conftest import sample_text
from tests.model.reference import random_model

PROMPTS = ["And God said, Let there be light", "In the beginning", "The LORD is my shepherd"]
NEW_TOKENS = 24


def main(out: Path) -> Path:
    tokenizer = train_tokenizer(iter(sample_text("kjv")[:100_000].splitlines()), 500, out / "tokenizer")
    model = random_model(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_mup=True,
        input_mult=1.0,
        output_mult=0.5,
        mup_scale_factor=16.0,
    )
    export = export_hf(model, out / "export", tokenizer_dir=tokenizer, overwrite=True)
    ours, tok = load_pretrained(export, device="cpu")
    tokens = []
    for prompt in PROMPTS:
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = ours.generate(
                **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
        tokens.append(ids[0, inputs["input_ids"].shape[1] :].tolist())
    (out / "greedy.json").write_text(json.dumps({"prompts": PROMPTS, "tokens": tokens}))
    return export


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))

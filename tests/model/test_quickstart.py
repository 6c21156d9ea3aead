"""An export runs the model card's quick start in a fresh process with only transformers."""

import json
import os
import subprocess
import sys

import torch

from teleflm.model.io import export_hf, load_pretrained
from tests.model.reference import random_model

PROMPT = "Beijing is the capital of China."

# The card's quick start verbatim but for the path, behind an import blocker that makes teleflm
# unimportable; it also saves the prompt's logits for a finer comparison than tokens.
QUICK_START = """
import sys

class NoTeleflm:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "teleflm":
            raise ImportError("teleflm must not be imported by the quick start")

sys.meta_path.insert(0, NoTeleflm())
p, out = sys.argv[1], sys.argv[2]

import torch
from transformers import AutoTokenizer, AutoModelForCausalLM
tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True, device_map="auto", trust_remote_code=True)
inputs = tokenizer('Beijing is the capital of China.', return_tensors='pt').to(model.device)
generated = model.generate(**inputs, max_new_tokens=128, repetition_penalty=1.03)
print(tokenizer.decode(generated.cpu()[0], skip_special_tokens=True))

import json
with torch.no_grad():
    logits = model(**inputs).logits.float()
torch.save(logits, out + ".pt")
json.dump({"tokens": generated.cpu()[0].tolist(), "teleflm_imported": "teleflm" in sys.modules,
           "class": type(model).__module__ + "." + type(model).__name__, "dtype": str(model.dtype)},
          open(out, "w"))
"""


def test_card_quick_start_in_a_fresh_process(tmp_path, sentencepiece_dir):
    model = random_model(
        vocab_size=2048, use_mup=True, input_mult=1.0, output_mult=0.5, mup_scale_factor=16.0
    )
    export = export_hf(model, tmp_path / "export", tokenizer_dir=sentencepiece_dir)
    script, result = tmp_path / "quick_start.py", tmp_path / "result.json"
    script.write_text(QUICK_START)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # cwd is a bare temporary folder: not the repository, so only an import could find teleflm.
    proc = subprocess.run(
        [sys.executable, str(script), str(export), str(result)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(result.read_text())
    assert theirs["teleflm_imported"] is False
    assert theirs["class"].startswith("transformers_modules.") and theirs["class"].endswith(
        ".TeleFLMForCausalLM"
    )
    assert theirs["dtype"] == "torch.bfloat16"

    # Our own generate, same dtype and settings.
    ours, tokenizer = load_pretrained(export, dtype=torch.bfloat16, device="cpu")
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        generated = ours.generate(**inputs, max_new_tokens=128, repetition_penalty=1.03)
        our_logits = ours(**inputs).logits.float()
    assert theirs["tokens"] == generated[0].tolist()
    assert len(theirs["tokens"]) > inputs["input_ids"].shape[1]
    assert torch.equal(torch.load(str(result) + ".pt", weights_only=True), our_logits)

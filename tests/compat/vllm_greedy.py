"""vLLM (where it is installed) on the export of tests/compat/make_export.py: its greedy tokens must
equal teleflm's (`greedy.json`). Run by scripts/vllm_check.sh in vLLM's own environment.

    python tests/compat/vllm_greedy.py OUT
"""

import json
import sys
from pathlib import Path


def main(out: str) -> int:
    from vllm import LLM, SamplingParams

    reference = json.loads(Path(out, "greedy.json").read_text())
    new_tokens = len(reference["tokens"][0])
    # A small model on a CPU: little memory for the KV cache, no CUDA graphs.
    llm = LLM(
        model=f"{out}/export",
        dtype="float32",
        trust_remote_code=True,
        enforce_eager=True,
        max_model_len=256,
        gpu_memory_utilization=0.1,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    theirs = [o.outputs[0].token_ids for o in llm.generate(reference["prompts"], params)]
    same = [list(t) == r for t, r in zip(theirs, reference["tokens"], strict=True)]
    print(json.dumps({"prompts": len(same), "equal": sum(same), "vllm": [list(t) for t in theirs]}))
    return 0 if all(same) else 1


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    sys.exit(main(sys.argv[1]))

"""A completion from `teleflm serve --engine vllm` (started by scripts/vllm_check.sh) equals the text
of teleflm's greedy tokens on the same export.

    python -m tests.compat.vllm_serve_check OUT PORT
"""

import json
import sys
import time
from pathlib import Path

import httpx
from tokenizers import Tokenizer


def main(out: Path, port: int) -> int:
    reference = json.loads((out / "greedy.json").read_text())
    tokenizer = Tokenizer.from_file(str(out / "export" / "tokenizer.json"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:  # vLLM takes a minute or so to start
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError("vLLM's server did not come up in 600 s")
        time.sleep(2)
    new_tokens = len(reference["tokens"][0])
    body = {"model": "export", "prompt": reference["prompts"][0], "max_tokens": new_tokens}
    body |= {"min_tokens": new_tokens, "temperature": 0}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    text = answer["choices"][0]["text"]
    expected = tokenizer.decode(reference["tokens"][0], skip_special_tokens=True)
    print(json.dumps({"served_text_equals_teleflm": text == expected, "text": text[:60]}))
    return 0 if text == expected else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))

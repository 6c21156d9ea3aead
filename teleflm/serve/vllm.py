"""`teleflm serve --engine vllm`: serve an export with vLLM's OpenAI server instead of our engine.

vLLM has its own Tele-FLM model (`teleflm.py`, reading `use_mup`, `input_mult`, `output_mult` and
`mup_scale_factor` from config.json), so an export loads there as it is. vLLM pins its own torch and
transformers, so it usually lives in an environment of its own (`bash scripts/vllm_check.sh` makes
one, `.vllm/`): `--vllm-python` names that interpreter, else the current one must import vllm.
"""

import importlib.util
import sys
from pathlib import Path


def vllm_python(given: str | None) -> str:
    """The interpreter that runs vLLM: `given`, else this one if it has vllm."""
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--vllm-python {given} does not exist")
        return given
    if importlib.util.find_spec("vllm") is None:
        raise FileNotFoundError(
            "vllm is not installed here: give --vllm-python PATH (an environment with vllm, e.g. the "
            "one `bash scripts/vllm_check.sh` makes in .vllm/bin/python)"
        )
    return sys.executable


def vllm_command(
    python: str,
    model: str,
    name: str,
    host: str,
    port: int,
    api_key: str | None,
    max_batch: int,
    dtype: str | None,
    extra: list[str] = (),
) -> list[str]:
    """vLLM's OpenAI-compatible server with the settings `teleflm serve` takes, then `extra` (what
    followed `--` on the command line, e.g. `--gpu-memory-utilization 0.2`)."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--served-model-name", name, "--host", host, "--port", str(port)]
    command += ["--trust-remote-code", "--max-num-seqs", str(max_batch)]
    if dtype:
        command += ["--dtype", {"bf16": "bfloat16", "fp32": "float32"}[dtype]]
    if api_key:
        command += ["--api-key", api_key]
    return command + list(extra)

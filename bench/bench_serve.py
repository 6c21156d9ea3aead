"""Serving throughput: 16 concurrent requests against the same 16 sent one by one, through
`teleflm serve` (a separate process) and the official openai client; total completion tokens/s and
the ratio, with the engine's own counters (forward passes, largest batch). Also the 16 concurrent
requests with a `response_format` JSON schema (structured output's cost), and, with `--vllm-python`
(an interpreter that has vLLM, e.g. `.vllm/bin/python` from scripts/vllm_check.sh), the same
concurrent runs through `teleflm serve --engine vllm` on the same export.

    .venv/bin/python -m bench.bench_serve [--requests 16 --max-tokens 64] [--vllm-python PATH] [--json out.json]
"""

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from teleflm.data.sample import kjv_chapters
from teleflm.data.tokenizer import train_tokenizer
from teleflm.model import TeleFLMConfig, TeleFLMForCausalLM
from teleflm.model.io import export_hf

SHAPE = dict(  # bench_generate's model
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
MODEL_NAME = "bench"
SERVER_THREADS = 1
SCHEMA = {  # bounded, so that every request can finish inside max_tokens
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
SCHEMA_TOKENS = 64  # the longest answer SCHEMA allows fits in this many tokens of the bench's tokenizer


def build_export(root: Path) -> tuple[Path, list[str]]:
    """A random model with a 2,000-entry byte-level tokenizer trained on the KJV, and prompts (KJV verses)."""
    text = "\n\n".join(kjv_chapters())[:400_000]  # the KJV shipped with teleflm
    lines = [line for line in text.splitlines() if len(line) > 40]
    tokenizer_dir = train_tokenizer(iter(lines), 2000, root / "tokenizer")
    torch.manual_seed(0)
    folder = export_hf(
        TeleFLMForCausalLM(TeleFLMConfig(**SHAPE)), root / "export", tokenizer_dir=tokenizer_dir
    )
    return folder, lines[100:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    folder: Path, port: int, max_batch: int, log: Path, vllm_python: str | None = None
) -> subprocess.Popen:
    command = [sys.executable, "-m", "teleflm.cli.main", "serve", "--model", str(folder)]
    command += ["--port", str(port), "--max-batch", str(max_batch), "--served-model-name", MODEL_NAME]
    if vllm_python:  # vLLM on a CPU: little memory for its cache, no graph capture
        command += ["--engine", "vllm", "--vllm-python", vllm_python, "--dtype", "fp32", "--"]
        command += ["--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.1"]
    # One torch thread: on a small shared CPU, two OpenMP threads spin-wait on each other and make
    # every step of a model this small several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": str(SERVER_THREADS)}
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start in 600 s")


async def run(
    client, prompts: list[str], max_tokens: int, concurrent: bool, structured: bool = False
) -> tuple[float, int, int | None]:
    """(seconds, completion tokens, answers that validate against SCHEMA or None) for all prompts,
    sent together or one after another; with `structured`, each answer is asked to follow SCHEMA."""

    def ask(prompt):
        if structured:
            response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
            return client.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max(max_tokens, SCHEMA_TOKENS),
                temperature=0,
                response_format=response_format,
            )
        return client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0
        )

    started = time.perf_counter()
    if concurrent:
        responses = await asyncio.gather(*(ask(p) for p in prompts))
    else:
        responses = [await ask(p) for p in prompts]
    seconds = time.perf_counter() - started
    tokens = sum(r.usage.completion_tokens for r in responses)
    if not structured:
        return seconds, tokens, None
    return seconds, tokens, sum(valid(r.choices[0].message.content) for r in responses)


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def engine_stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health").json()["engine"]


MODES = {  # name: (concurrent, structured)
    "sequential": (False, False),
    "concurrent": (True, False),
    "concurrent structured": (True, True),
}


async def measure(port: int, prompts: list[str], max_tokens: int, modes: list[str], teleflm: bool) -> dict:
    from openai import AsyncOpenAI

    figures = {}
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
        await run(client, prompts[:1], 8, concurrent=False)  # warm-up
        await run(client, prompts[:1], max_tokens, concurrent=False, structured=True)  # grammar set up
        for mode in modes:
            before = engine_stats(port) if teleflm else None
            seconds, tokens, valid_answers = await run(client, prompts, max_tokens, *MODES[mode])
            figures[mode] = {
                "seconds": round(seconds, 3),
                "completion_tokens": tokens,
                "tokens_per_s": round(tokens / seconds, 1),
            }
            if valid_answers is not None:
                figures[mode]["valid"] = f"{valid_answers}/{len(prompts)}"
            if teleflm:
                after = engine_stats(port)
                figures[mode]["forward_passes"] = after["forward_passes"] - before["forward_passes"]
                figures[mode]["max_batch_seen"] = after["max_batch_seen"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm-python", metavar="PATH", help="also measure vLLM through this interpreter")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    engines = {"teleflm": None} | ({"vllm": args.vllm_python} if args.vllm_python else {})
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder, verses = build_export(Path(tmp))
        prompts = verses[: args.requests]
        for engine, vllm_python in engines.items():
            port = free_port()
            log = Path(tmp) / f"{engine}.log"
            server = start_server(folder, port, args.requests, log, vllm_python)
            modes = list(MODES) if engine == "teleflm" else ["concurrent", "concurrent structured"]
            try:
                figures[engine] = asyncio.run(
                    measure(port, prompts, args.max_tokens, modes, engine == "teleflm")
                )
            finally:
                server.terminate()
                server.wait(timeout=60)
    print(
        f"model: {SHAPE}; {args.requests} requests x {args.max_tokens} tokens, greedy, fp32, "
        f"server threads {SERVER_THREADS}"
    )
    header = f"{'engine':8} {'mode':22} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'passes':>7}"
    print(f"{header} {'max batch':>9} {'valid JSON':>10}")
    for engine, rows in figures.items():
        for mode, f in rows.items():
            passes, batch = f.get("forward_passes", "-"), f.get("max_batch_seen", "-")
            print(
                f"{engine:8} {mode:22} {f['seconds']:8.2f} {f['completion_tokens']:7d} "
                f"{f['tokens_per_s']:9.1f} {passes:>7} {batch:>9} {f.get('valid', '-'):>10}"
            )
    ours = figures["teleflm"]
    ratios = {
        "concurrent / sequential": ours["concurrent"]["tokens_per_s"] / ours["sequential"]["tokens_per_s"],
        "structured / free (concurrent)": ours["concurrent structured"]["tokens_per_s"]
        / ours["concurrent"]["tokens_per_s"],
    }
    if "vllm" in figures:
        for mode in ("concurrent", "concurrent structured"):
            ratios[f"teleflm / vllm ({mode})"] = (
                ours[mode]["tokens_per_s"] / figures["vllm"][mode]["tokens_per_s"]
            )
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    result = {"model": SHAPE, "requests": args.requests, "max_tokens": args.max_tokens}
    result |= {"server_threads": SERVER_THREADS, "figures": figures, "ratios": ratios}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

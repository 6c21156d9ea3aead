"""Serving throughput: 16 concurrent requests against the same 16 sent one by one, through
`teleflm serve` (a separate process) and the official openai client; total completion tokens/s and
the ratio, with the engine's own counters (forward passes, largest batch).

    .venv/bin/python -m bench.bench_serve [--requests 16 --max-tokens 64] [--json out.json]
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


def start_server(folder: Path, port: int, max_batch: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "teleflm.cli.main", "serve", "--model", str(folder)]
    command += ["--port", str(port), "--max-batch", str(max_batch), "--served-model-name", MODEL_NAME]
    # One torch thread: on a small shared CPU, two OpenMP threads spin-wait on each other and make
    # every step of a model this small several times slower.
    env = {**os.environ, "OMP_NUM_THREADS": str(SERVER_THREADS)}
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start in 120 s")


async def run(client, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[float, int]:
    """(seconds, completion tokens) for all prompts, sent together or one after another."""

    def ask(prompt):
        return client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0
        )

    started = time.perf_counter()
    if concurrent:
        responses = await asyncio.gather(*(ask(p) for p in prompts))
    else:
        responses = [await ask(p) for p in prompts]
    seconds = time.perf_counter() - started
    return seconds, sum(r.usage.completion_tokens for r in responses)


def engine_stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health").json()["engine"]


async def measure(port: int, prompts: list[str], max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    figures = {}
    async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as client:
        await run(client, prompts[:1], 8, concurrent=False)  # warm-up
        for mode in ("sequential", "concurrent"):
            before = engine_stats(port)
            seconds, tokens = await run(client, prompts, max_tokens, concurrent=mode == "concurrent")
            after = engine_stats(port)
            figures[mode] = {
                "seconds": round(seconds, 3),
                "completion_tokens": tokens,
                "tokens_per_s": round(tokens / seconds, 1),
                "forward_passes": after["forward_passes"] - before["forward_passes"],
                "max_batch_seen": after["max_batch_seen"],
            }
    figures["ratio"] = round(figures["concurrent"]["tokens_per_s"] / figures["sequential"]["tokens_per_s"], 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, verses = build_export(Path(tmp))
        prompts = verses[: args.requests]
        port = free_port()
        server = start_server(folder, port, max_batch=args.requests, log=Path(tmp) / "server.log")
        try:
            figures = asyncio.run(measure(port, prompts, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(
        f"model: {SHAPE}; {args.requests} requests x {args.max_tokens} tokens, greedy, fp32, "
        f"server threads {SERVER_THREADS}"
    )
    print(f"{'mode':11} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'passes':>7} {'max batch':>9}")
    for mode in ("sequential", "concurrent"):
        f = figures[mode]
        print(
            f"{mode:11} {f['seconds']:8.2f} {f['completion_tokens']:7d} {f['tokens_per_s']:9.1f} "
            f"{f['forward_passes']:7d} {f['max_batch_seen']:9d}"
        )
    print(f"concurrent / sequential tokens/s: {figures['ratio']:.2f}x")
    result = {"model": SHAPE, "requests": args.requests, "max_tokens": args.max_tokens}
    result |= {"server_threads": SERVER_THREADS, **figures}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

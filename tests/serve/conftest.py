"""A tiny model exported with a byte-level tokenizer that has the chat markers, and an
OpenAI-compatible server on it, started in a thread of the test process on a free loopback port."""

import threading
import time
from dataclasses import dataclass

import pytest

from teleflm.model.io import export_hf, load_pretrained
from tests.conftest import sample_text
from tests.model.conftest import one_thread  # noqa: F401  (shared fixture)
from tests.model.reference import random_model

TOKENIZER_VOCAB = 500
MODEL_VOCAB = 512  # the embedding is padded past the tokenizer, as in Tele-FLM
CONTEXT = 128
MODEL_NAME = "tiny-teleflm"


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    from teleflm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("serve")
    lines = sample_text("kjv")[:100_000].splitlines()
    tokenizer_dir = train_tokenizer(iter(lines), TOKENIZER_VOCAB, root / "tokenizer")
    model = random_model(vocab_size=MODEL_VOCAB, max_position_embeddings=CONTEXT)
    return export_hf(model, root / "export", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def model_and_tokenizer(export_dir):
    return load_pretrained(export_dir, device="cpu")


@dataclass
class Server:
    url: str  # ending in /v1, as the openai client wants it
    engine: object


def start_server(engine, api_key: str | None = None):
    """(uvicorn.Server, Server) for `engine`, served on a free port until `.should_exit`."""
    import uvicorn

    from teleflm.serve.api import create_app

    config = uvicorn.Config(
        create_app(engine, MODEL_NAME, api_key), host="127.0.0.1", port=0, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, Server(f"http://127.0.0.1:{port}/v1", engine)


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    """A server on the tiny model, batching up to 16 requests; stopped after the module."""
    import torch

    from teleflm.serve.engine import Engine

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine thread computes while the test's clients wait
    model, tokenizer = model_and_tokenizer
    uvicorn_server, thread, handle = start_server(Engine(model, tokenizer, max_batch=16))
    yield handle
    uvicorn_server.should_exit = True
    thread.join(timeout=30)
    torch.set_num_threads(previous)


def greedy_reference(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """What `model.generate` continues `prompt_ids` with (greedy, padded ids suppressed), as text."""
    import torch

    with torch.no_grad():
        ids = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            suppress_tokens=list(range(TOKENIZER_VOCAB, MODEL_VOCAB)),
        )
    full = tokenizer.decode(ids[0], skip_special_tokens=True)
    return full[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)) :]


def client(server, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=server.url, api_key="unused", max_retries=0, **kwargs)


def async_client(server):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture
def held_engine(server, monkeypatch):
    """The server's engine held before each step after its first until a running request is cancelled
    (or 30 s pass): a request cannot finish before the API notices its client gone, whatever the
    timing. Returns an Event set once the first step has run."""
    engine = server.engine
    step, started = engine.step, threading.Event()

    def held_step():
        if started.is_set():
            deadline = time.monotonic() + 30
            while not any(r.cancelled for r in engine.running) and time.monotonic() < deadline:
                time.sleep(0.005)
        step()
        started.set()

    monkeypatch.setattr(engine, "step", held_step)
    return started

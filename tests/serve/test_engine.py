"""The batching engine driven step by step (no thread, no HTTP): requests that join a running batch
get exactly what `model.generate` gives them alone, slots are bounded and freed, and a bad request
fails alone."""

import threading

import torch

from teleflm.serve.engine import Engine, GenerationRequest, SamplingParams
from tests.serve.conftest import greedy_reference

PROMPTS = [
    "And God said",
    "In the beginning God created the heaven and the earth.",
    "Let there be light",
    "x",
]


class Collected:
    """A request with everything the engine sent it."""

    def __init__(self, tokenizer, prompt: str, **params):
        self.outputs = []
        self.finished = threading.Event()
        params = {"max_tokens": 16, "temperature": 0.0, **params}
        self.request = GenerationRequest(
            tokenizer(prompt)["input_ids"], SamplingParams(**params), self.receive
        )

    def receive(self, output) -> None:
        self.outputs.append(output)
        if output.finish_reason:
            self.finished.set()

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


def run_to_end(engine: Engine) -> None:
    while engine.load()["running"] or engine.load()["waiting"]:
        engine.step()


def test_requests_joining_a_running_batch_get_what_generate_gives(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=8)
    requests = [Collected(tokenizer, p, max_tokens=12 + 4 * i) for i, p in enumerate(PROMPTS)]
    engine.submit(requests[0].request)
    for _ in range(3):  # the first request is 3 tokens in when the others arrive
        engine.step()
    for r in requests[1:]:
        engine.submit(r.request)
    run_to_end(engine)
    for i, r in enumerate(requests):
        assert r.text == greedy_reference(model, tokenizer, r.request.prompt_ids, 12 + 4 * i)
        assert r.outputs[-1].finish_reason == "length" and r.outputs[-1].completion_tokens == 12 + 4 * i
        assert len(r.outputs) > 1  # text arrived step by step
    assert engine.stats.max_batch_seen == 4
    assert engine.stats.forward_passes == 3 + 24  # the longest request's 24 steps, after 3 alone
    assert engine.stats.generated_tokens == sum(12 + 4 * i for i in range(4))
    assert engine.cache.mask.shape[0] == 0 and engine.cache.get_seq_length() == 0  # all freed


def test_repetition_penalty_matches_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    r = Collected(tokenizer, PROMPTS[0], max_tokens=30, repetition_penalty=1.3)
    engine.submit(r.request)
    run_to_end(engine)
    ids = torch.tensor([r.request.prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=30,
            do_sample=False,
            repetition_penalty=1.3,
            suppress_tokens=list(range(500, 512)),
        )
    assert r.request.output_ids == out[0, ids.shape[1] :].tolist()


def test_max_batch_bounds_the_batch_and_the_cache_stays_compact(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=2)
    requests = [Collected(tokenizer, PROMPTS[i % 4], max_tokens=5 + i) for i in range(5)]
    for r in requests:
        engine.submit(r.request)
    while engine.load()["running"] or engine.load()["waiting"]:
        engine.step()
        assert engine.load()["running"] <= 2
        if engine.cache.mask.numel():
            # Each column holds a real token of at least one row: padding shared by all is cut.
            assert bool(engine.cache.mask.any(dim=0).all())
    assert engine.stats.max_batch_seen == 2
    assert [r.outputs[-1].completion_tokens for r in requests] == [5, 6, 7, 8, 9]


def test_cancelled_request_frees_its_slot(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, max_batch=2)
    stays, leaves, waits = (Collected(tokenizer, p, max_tokens=20) for p in PROMPTS[:3])
    for r in (stays, leaves, waits):
        engine.submit(r.request)
    engine.step()
    assert engine.load() == {"running": 2, "waiting": 1}
    leaves.request.cancel()
    engine.step()  # drops the cancelled request, admits the waiting one
    assert engine.load() == {"running": 2, "waiting": 0} and engine.stats.cancelled == 1
    run_to_end(engine)
    assert not leaves.finished.is_set()  # nobody is listening: nothing more is sent
    assert stays.text == greedy_reference(model, tokenizer, stays.request.prompt_ids, 20)
    assert waits.text == greedy_reference(model, tokenizer, waits.request.prompt_ids, 20)


def test_a_failing_request_fails_alone_and_the_engine_goes_on(model_and_tokenizer):
    """A bad request joins a batch with one request mid-way and another joining with it: the batched
    step fails, and only the bad request finishes with the error; the others get what `generate`
    gives them alone."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer)
    running = Collected(tokenizer, PROMPTS[1], max_tokens=12)
    engine.submit(running.request)
    for _ in range(3):
        engine.step()
    bad = Collected(tokenizer, "x")
    bad.request.prompt_ids = [model.config.vocab_size + 7]  # no such embedding row
    joining = Collected(tokenizer, PROMPTS[0], max_tokens=8)
    engine.submit(bad.request)
    engine.submit(joining.request)
    run_to_end(engine)
    assert bad.outputs[-1].finish_reason == "error" and "IndexError" in bad.outputs[-1].error
    assert running.outputs[-1].finish_reason == "length" and joining.outputs[-1].finish_reason == "length"
    assert running.text == greedy_reference(model, tokenizer, running.request.prompt_ids, 12)
    assert joining.text == greedy_reference(model, tokenizer, joining.request.prompt_ids, 8)

    engine.start()  # the engine thread: a request failing alone fails itself, and serving goes on
    try:
        bad = Collected(tokenizer, "x")
        bad.request.prompt_ids = [model.config.vocab_size + 7]
        engine.submit(bad.request)
        assert bad.finished.wait(30)
        assert bad.outputs[-1].finish_reason == "error" and "IndexError" in bad.outputs[-1].error
        good = Collected(tokenizer, PROMPTS[0], max_tokens=8)
        engine.submit(good.request)
        assert good.finished.wait(30)
        assert good.text == greedy_reference(model, tokenizer, good.request.prompt_ids, 8)
    finally:
        engine.stop()

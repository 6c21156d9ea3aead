"""The rest of the API people use, through the official openai client: logprobs that are the model's
own, n choices, seeds, structured output that always parses and validates, usage in streams, and a
non-streaming client that leaves."""

import asyncio
import json
import socket
import time

import pytest
import torch

from teleflm.sft.template import prompt_ids
from tests.serve.conftest import CONTEXT, MODEL_NAME, MODEL_VOCAB, TOKENIZER_VOCAB, async_client, client

PROMPT = "And God said"


def reference_logprobs(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """log_softmax over the tokenizer's vocabulary of the model's logits at each generated position,
    from one forward pass over prompt + generation without a cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits[:, :TOKENIZER_VOCAB].float(), dim=-1)


def greedy_ids(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            suppress_tokens=list(range(TOKENIZER_VOCAB, MODEL_VOCAB)),
        )
    return out[0, len(prompt) :].tolist()


def test_chat_logprobs_are_the_models(server, model_and_tokenizer):
    """Each token's logprob (and its top 3) is log_softmax of the model's logits over the tokenizer's
    vocabulary: padded ids, which hold a few percent of a random model's mass, get none."""
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "Who made the light?"}]
    prompt = prompt_ids(tokenizer, messages)
    ids = greedy_ids(model, prompt, 12)
    answer = client(server).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert [e.token for e in content] == [tokenizer.decode([i]) for i in ids]
    reference = reference_logprobs(model, prompt, ids)
    for step, entry in enumerate(content):
        assert entry.logprob == pytest.approx(reference[step, ids[step]].item(), abs=1e-4)
        best = reference[step].topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in best.indices.tolist()]
        assert entry.bytes == list(entry.token.encode())


def test_completion_logprobs_legacy_shape(server, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = tokenizer(PROMPT)["input_ids"]
    ids = greedy_ids(model, prompt, 8)
    answer = client(server).completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    )
    lp = answer.choices[0].logprobs
    assert lp.tokens == [tokenizer.decode([i]) for i in ids]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    reference = reference_logprobs(model, prompt, ids)
    assert lp.token_logprobs == pytest.approx(reference[range(8), ids].tolist(), abs=1e-4)
    for step, alternatives in enumerate(lp.top_logprobs):
        assert sorted(alternatives.values()) == pytest.approx(
            sorted(reference[step].topk(2).values.tolist()), abs=1e-4
        )


def test_n_choices_greedy_and_seeded(server):
    c = client(server)
    greedy = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, n=4)
    assert [ch.index for ch in greedy.choices] == [0, 1, 2, 3]
    assert len({ch.text for ch in greedy.choices}) == 1 and greedy.choices[0].text
    one = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=1)
    # The prompt is counted once, however many choices continue it.
    assert greedy.usage.prompt_tokens == one.usage.prompt_tokens and greedy.usage.completion_tokens == 48

    def sampled(seed):
        answer = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, n=4, seed=seed)
        return [ch.text for ch in sorted(answer.choices, key=lambda ch: ch.index)]

    first = sampled(7)
    assert first == sampled(7) and first != sampled(8)
    assert len(set(first)) > 1  # the choices of one request differ from each other


def test_streamed_n_choices_and_usage(server):
    stream = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, reasons, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert texts[0] == texts[1] and texts[0] and reasons == {0: "length", 1: "length"}
    assert usage.completion_tokens == 12 and usage.total_tokens == usage.prompt_tokens + 12


SCHEMAS = [
    {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
    {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "integer", "maximum": 99, "minimum": 0}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        },
        "required": ["point", "tags"],
        "additionalProperties": False,
    },
    {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
]  # fmt: skip


def test_structured_output_always_validates(server):
    """100 concurrent requests over 5 schemas, sampled at temperature 1 from a model that never saw
    JSON: every output parses and validates."""
    import jsonschema

    async def one(c, i):
        schema = SCHEMAS[i % len(SCHEMAS)]
        answer = await c.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"Answer {i} in JSON."}],
            max_tokens=96,
            seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i % 5}", "schema": schema}},
        )
        return schema, answer.choices[0]

    async def run():
        c = async_client(server)
        return await asyncio.gather(*(one(c, i) for i in range(100)))

    before = server.engine.stats.max_batch_seen
    results = asyncio.run(run())
    for schema, choice in results:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert server.engine.stats.max_batch_seen > 1 or before > 1  # they were batched together


@pytest.mark.parametrize(
    "structured, check",
    [
        ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[:3].isdigit() and t[3] == "-"),
        ({"choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
        ({"grammar": 'start: "(" NUMBER ("," NUMBER)? ")"\nNUMBER: /[0-9]{1,3}/'}, lambda t: t[0] == "(" and t[-1] == ")"),
        ({"json": {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False}},
         lambda t: isinstance(json.loads(t)["a"], bool)),
    ],
)  # fmt: skip
def test_regex_choice_grammar_and_json(server, structured, check):
    c = client(server)
    answer = c.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=40, seed=3, extra_body={"structured_outputs": structured}
    )
    assert answer.choices[0].finish_reason == "stop" and check(answer.choices[0].text), answer.choices[0].text


def test_json_object_mode(server):
    answer = client(server).chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "JSON please"}],
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:  # any object is allowed, so a greedy random model may fill the budget inside a string
        assert answer.choices[0].finish_reason == "length" and answer.choices[0].message.content[0] == "{"


def test_non_streaming_client_that_leaves_frees_its_slot(server, held_engine):
    """The client closes its connection while its request is decoding; the engine is held
    (`held_engine`), so only the API noticing the client gone lets the request go on."""
    engine, started = server.engine, held_engine
    cancelled = engine.stats.cancelled
    body = json.dumps(
        {"model": MODEL_NAME, "prompt": "x", "max_tokens": CONTEXT - 2, "temperature": 0}
    ).encode()
    host, port = server.url.removeprefix("http://").removesuffix("/v1").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert started.wait(30), "the request never started"
    deadline = time.monotonic() + 40
    while engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats.cancelled == cancelled + 1 and engine.load()["running"] == 0


def test_logprobs_stay_the_models_under_a_grammar_and_a_penalty(server, model_and_tokenizer):
    """The grammar and the repetition penalty pick the token; its logprob is still the model's."""
    model, tokenizer = model_and_tokenizer
    answer = client(server).completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logprobs=1,
        extra_body={"structured_outputs": {"regex": "[a-z ]{10}"}, "repetition_penalty": 1.3},
    )
    lp = answer.choices[0].logprobs
    ids = [i for t in lp.tokens for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    assert tokenizer.decode(ids) == answer.choices[0].text and len(ids) == len(lp.tokens)
    reference = reference_logprobs(model, tokenizer(PROMPT)["input_ids"], ids)
    assert lp.token_logprobs == pytest.approx(reference[range(len(ids)), ids].tolist(), abs=1e-4)
    # Some step chose another token than the unconstrained greedy one (its logprob is below the top).
    assert any(lp.token_logprobs[i] < reference[i].max().item() - 1e-3 for i in range(len(ids)))

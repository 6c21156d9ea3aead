"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (server-sent
events with `"stream": true`), POST /v1/embeddings. Every error is a 4xx or 5xx response in OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`; request bodies are pydantic models that
refuse unknown fields, so a parameter this server does not implement is an error, not silently
ignored. With an API key, /v1 routes need `Authorization: Bearer KEY`.

Generation takes OpenAI's `n`, `seed`, `stop` (a string or a list), `logprobs` (and `top_logprobs` in
chat), `stream_options.include_usage` and `response_format` (`json_object`, `json_schema`), plus vLLM's
`structured_outputs` (`json`, `regex`, `grammar` in Lark, `choice`) and `repetition_penalty`. A client
that goes away, streaming or not, cancels its requests, which frees their slots in the batch.
"""

import asyncio
import base64
import json
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from teleflm.serve.constrain import Constraint, ConstraintError, grammar_of
from teleflm.serve.engine import (
    MAX_TOP_LOGPROBS,
    EmbeddingJob,
    Engine,
    GenerationRequest,
    Output,
    SamplingParams,
    TokenLogprob,
)
from teleflm.sft.template import prompt_ids

# ----- errors -----


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(error: dict) -> tuple[str, str | None]:
    """(message, param) for one of pydantic's errors, e.g. ("max_tokens: Input should be greater
    than or equal to 1", "max_tokens")."""
    if error["type"] == "json_invalid":
        return f"malformed JSON body: {error.get('ctx', {}).get('error', error['msg'])}", None
    location = [str(part) for part in error["loc"] if part != "body"]
    param = ".".join(location) or None
    if param is None:  # the body as a whole: not JSON, or not sent as JSON
        return f"the body must be a JSON object sent as application/json ({error['msg']})", None
    if error["type"] == "extra_forbidden":
        return f"{param}: not a parameter this server supports", param
    return f"{param}: {error['msg']}", param


class BearerAuth:
    """ASGI middleware: /v1 routes answer 401 unless `Authorization: Bearer KEY` (before the body is
    even read)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                body = error_body(
                    "missing or wrong API key (send Authorization: Bearer KEY)",
                    "authentication_error",
                    code="invalid_api_key",
                )
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ----- request bodies -----


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False


MAX_CHOICES = 16  # `n`: choices per request
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class JsonSchemaFormat(StrictModel):
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(StrictModel):
    """vLLM's extension: exactly one of a JSON schema, a regex, a Lark grammar or a list of choices."""

    json_: dict | None = Field(None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = Field(None, min_length=1)


class GenerationFields(StrictModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    user: str | None = None
    # Not OpenAI's, but vLLM's and transformers': the model card's sampling uses 1.03.
    repetition_penalty: float = Field(1.0, gt=0.0)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def top_logprobs_asked(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        raise NotImplementedError

    def constraint_spec(self) -> tuple[str, object, str] | None:
        """(kind, spec, param) of the asked output format, or None for free text."""
        fmt, structured = self.response_format, self.structured_outputs
        asked = []
        if fmt is not None and fmt.type == "json_object":
            asked.append(("json_object", None, "response_format"))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format: json_schema needs its json_schema", "response_format")
            asked.append(("json_schema", fmt.json_schema.schema_, "response_format"))
        if structured is not None:
            given = {k: v for k, v in structured.model_dump(by_alias=True).items() if v is not None}
            if len(given) != 1:
                raise APIError(
                    400,
                    "structured_outputs: give exactly one of json, regex, grammar, choice",
                    "structured_outputs",
                )
            ((kind, spec),) = given.items()
            if kind == "choice":  # any one of the strings, verbatim
                kind, spec = "regex", "|".join(re.escape(c) for c in spec)
            asked.append(({"json": "json_schema"}.get(kind, kind), spec, "structured_outputs"))
        if len(asked) > 1:
            raise APIError(400, "give response_format or structured_outputs, not both", "structured_outputs")
        return asked[0] if asked else None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if "" in stops:
            raise APIError(400, "stop: a stop string must not be empty", param="stop")
        return tuple(stops)


class CompletionRequest(GenerationFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API: alternatives per token

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_asked(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs to be true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class EmbeddingRequest(StrictModel):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def include_usage(body: GenerationFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def encode_vector(vector, encoding_format: str):
    if encoding_format == "base64":  # what the openai client asks for: little-endian float32
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


# ----- bridging the engine thread and the event loop -----


@dataclass
class Job:
    """One generation of a request (a request has `n` per prompt)."""

    prompt_ids: list[int]
    params: SamplingParams
    constraint: Constraint | None = None


@dataclass
class Result:
    """A finished generation."""

    text: str
    finish_reason: str
    completion_tokens: int
    logprobs: list[TokenLogprob]


def usage_of(jobs: list[Job], results: list[Result]) -> dict[str, int]:
    """OpenAI's usage: each prompt counted once however many choices it has (its jobs share its ids)."""
    prompts = {id(j.prompt_ids): len(j.prompt_ids) for j in jobs}
    completion = sum(r.completion_tokens for r in results)
    return {
        "prompt_tokens": sum(prompts.values()),
        "completion_tokens": completion,
        "total_tokens": sum(prompts.values()) + completion,
    }


async def outputs(engine: Engine, jobs: list[Job]) -> AsyncIterator[tuple[int, Output]]:
    """(job index, output) from the engine for every job, until each has finished. Leaving early (a
    client that went away cancels the task) cancels every request, which frees their slots."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()

    def sender(index: int):
        return lambda out: loop.call_soon_threadsafe(queue.put_nowait, (index, out))

    requests = [
        GenerationRequest(j.prompt_ids, j.params, sender(i), j.constraint) for i, j in enumerate(jobs)
    ]
    for request in requests:
        engine.submit(request)
    running = len(requests)
    try:
        while running:
            index, output = await queue.get()
            yield index, output
            running -= output.finish_reason is not None
    finally:
        for request in requests:
            request.cancel()  # a no-op for a finished request


async def complete(engine: Engine, jobs: list[Job], http: Request) -> list[Result]:
    """Every job run to its end; a client that disconnects before cancels them all."""

    async def collect() -> list[Result]:
        texts = [[] for _ in jobs]
        items = [[] for _ in jobs]
        results: list[Result | None] = [None] * len(jobs)
        async for index, output in outputs(engine, jobs):
            if output.error:
                raise APIError(500, f"generation failed: {output.error}", kind="server_error")
            texts[index].append(output.text)
            items[index] += output.logprobs
            if output.finish_reason is not None:
                text = "".join(texts[index])
                results[index] = Result(text, output.finish_reason, output.completion_tokens, items[index])
        return results

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await http.is_disconnected():
            task.cancel()  # closes `outputs`, which cancels the requests
            raise APIError(499, "the client closed the connection", kind="client_closed_request")


async def stream_events(
    engine: Engine,
    jobs: list[Job],
    head: dict,
    choice: Callable[[int, str, str | None, list[TokenLogprob]], dict],
    first_choice: Callable[[int], dict] | None,
    with_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` per piece of text of a choice (its index in the chunk), one
    with each choice's finish reason, then a usage chunk if asked, then `data: [DONE]`."""

    def event(chunk: dict) -> str:
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    if first_choice is not None:
        for index in range(len(jobs)):
            yield event({**head, "choices": [first_choice(index)]})
    finished: list[Result] = []
    async for index, output in outputs(engine, jobs):
        if output.error:
            yield event(error_body(f"generation failed: {output.error}", "server_error"))
            break
        if output.text or output.logprobs:
            yield event({**head, "choices": [choice(index, output.text, None, list(output.logprobs))]})
        if output.finish_reason:
            yield event({**head, "choices": [choice(index, "", output.finish_reason, [])]})
            finished.append(Result("", output.finish_reason, output.completion_tokens, []))
    if with_usage and len(finished) == len(jobs):
        yield event({**head, "choices": [], "usage": usage_of(jobs, finished)})
    yield "data: [DONE]\n\n"


async def run_embedding(engine: Engine, texts: list[str]):
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def on_done(vectors, error) -> None:
        loop.call_soon_threadsafe(done.set_result, (vectors, error))

    engine.submit_embedding(EmbeddingJob(texts, on_done))
    vectors, error = await done
    if error:
        raise APIError(500, f"embedding failed: {error}", kind="server_error")
    return vectors


# ----- the app -----


class OpenAIService:
    """The routes' work over one engine serving one model name (the app's handlers are its methods)."""

    def __init__(self, engine: Engine, model_name: str):
        self.engine, self.model_name, self.tokenizer = engine, model_name, engine.tokenizer
        self.created = int(time.time())

    async def health(self):
        return {"status": "ok", "model": self.model_name, "engine": self.engine.stats_dict()}

    async def models(self):
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "teleflm"}
        return {"object": "list", "data": [card]}

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist (this server has {self.model_name!r})",
                "model",
                "model_not_found",
            )

    def jobs_for(
        self, prompt_ids: list[int], body: GenerationFields, max_tokens: int | None, param: str
    ) -> list[Job]:
        """The `n` generations of one prompt, refusing a prompt that does not fit the context and a
        format that does not compile."""
        context = self.engine.context
        if not prompt_ids:
            raise APIError(400, f"{param}: the prompt has no tokens", param)
        if len(prompt_ids) >= context:
            raise APIError(
                400,
                f"{param}: the prompt has {len(prompt_ids)} tokens; this model's context is {context} tokens",
                param,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = context - len(prompt_ids)
        elif len(prompt_ids) + max_tokens > context:
            raise APIError(
                400,
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds this "
                f"model's context of {context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        constraint = self.constraint_for(body)
        jobs = []
        for i in range(body.n):
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=body.stop_strings(),
                # Choice i of a seeded request has its own, reproducible stream of random numbers.
                seed=None if body.seed is None else body.seed + i,
                repetition_penalty=body.repetition_penalty,
                logprobs=body.top_logprobs_asked(),
            )
            jobs.append(Job(prompt_ids, params, constraint.copy() if constraint else None))
        return jobs

    def constraint_for(self, body: GenerationFields) -> Constraint | None:
        spec = body.constraint_spec()
        if spec is None:
            return None
        kind, value, param = spec
        try:
            return self.engine.grammar_tokenizer().constraint(grammar_of(kind, value))
        except (ConstraintError, ValueError) as e:
            raise APIError(400, f"{param}: {e}", param) from None

    def token_entry(self, item: TokenLogprob) -> dict:
        """Chat's logprobs entry of a token: its text, log-probability, UTF-8 bytes, alternatives."""

        def entry(token_id: int, logprob: float) -> dict:
            text = self.tokenizer.decode([token_id])
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {**entry(item.token_id, item.logprob), "top_logprobs": [entry(*alt) for alt in item.top]}

    def legacy_logprobs(self, items: list[TokenLogprob]) -> dict:
        """The completions API's logprobs: parallel lists per token."""
        decode = self.tokenizer.decode
        tokens = [decode([item.token_id]) for item in items]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {
            "tokens": tokens,
            "token_logprobs": [item.logprob for item in items],
            "top_logprobs": [{decode([t]): lp for t, lp in item.top} for item in items],
            "text_offset": offsets,
        }

    async def completions(self, body: CompletionRequest, http: Request):
        self.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: no prompt given", "prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "prompt: streaming takes one prompt", "prompt")
        jobs = []  # choice index = prompt index x n + choice of that prompt, as OpenAI numbers them
        for prompt in prompts:
            jobs += self.jobs_for(self.tokenizer(prompt)["input_ids"], body, body.max_tokens, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "model": self.model_name}
        head["created"] = int(time.time())
        with_logprobs = body.logprobs is not None

        def choice(index: int, text: str, reason: str | None, items: list[TokenLogprob]) -> dict:
            logprobs = self.legacy_logprobs(items) if with_logprobs else None
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

        if body.stream:
            events = stream_events(self.engine, jobs, head, choice, None, include_usage(body))
            return StreamingResponse(events, media_type="text/event-stream")
        results = await complete(self.engine, jobs, http)
        choices = [choice(i, r.text, r.finish_reason, r.logprobs) for i, r in enumerate(results)]
        return {**head, "choices": choices, "usage": usage_of(jobs, results)}

    async def chat_completions(self, body: ChatRequest, http: Request):
        self.check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = prompt_ids(self.tokenizer, messages)
        except Exception as e:  # a chat template may refuse a conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template refused them: {e}", "messages") from None
        jobs = self.jobs_for(ids, body, body.max_completion_tokens or body.max_tokens, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "model": self.model_name, "created": int(time.time())}

        def logprobs(items: list[TokenLogprob]) -> dict | None:
            return {"content": [self.token_entry(item) for item in items]} if body.logprobs else None

        if body.stream:

            def delta(index: int, text: str, reason: str | None, items: list[TokenLogprob]) -> dict:
                content = {"content": text} if text else {}
                return {
                    "index": index,
                    "delta": content,
                    "logprobs": logprobs(items),
                    "finish_reason": reason,
                }

            def first(index: int) -> dict:
                return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

            head["object"] = "chat.completion.chunk"
            events = stream_events(self.engine, jobs, head, delta, first, include_usage(body))
            return StreamingResponse(events, media_type="text/event-stream")
        results = await complete(self.engine, jobs, http)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": logprobs(r.logprobs),
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage_of(jobs, results)}

    async def embeddings(self, body: EmbeddingRequest):
        self.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input: no text given", "input")
        context, counts = self.engine.context, []
        for i, text in enumerate(texts):
            n = len(self.tokenizer(text)["input_ids"])
            if n == 0 or n > context:
                problem = "is empty" if n == 0 else f"has {n} tokens; the context is {context}"
                raise APIError(400, f"input[{i}] {problem}", "input")
            counts.append(n)
        vectors = await run_embedding(self.engine, texts)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
        return {"object": "list", "data": data, "model": self.model_name, "usage": usage}


async def api_error(request: Request, e: APIError):
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)


async def invalid_request(request: Request, e: RequestValidationError):
    message, param = validation_message(e.errors()[0])
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; it starts the engine's thread on startup and
    stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="teleflm", lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    service = OpenAIService(engine, model_name)
    app.add_api_route("/health", service.health, methods=["GET"])
    v1 = APIRouter(prefix="/v1")
    v1.add_api_route("/models", service.models, methods=["GET"])
    v1.add_api_route("/completions", service.completions, methods=["POST"])
    v1.add_api_route("/chat/completions", service.chat_completions, methods=["POST"])
    v1.add_api_route("/embeddings", service.embeddings, methods=["POST"])
    app.include_router(v1)
    return app

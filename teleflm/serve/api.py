"""The OpenAI-compatible HTTP API (FastAPI) over an `Engine`.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (server-sent
events with `"stream": true`), POST /v1/embeddings. Every error is a 4xx or 5xx response in OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`; request bodies are pydantic models that
refuse unknown fields, so a parameter this server does not implement is an error, not silently
ignored. With an API key, /v1 routes need `Authorization: Bearer KEY`.
"""

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from teleflm.serve.engine import EmbeddingJob, Engine, GenerationRequest, Output, SamplingParams
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


class GenerationFields(StrictModel):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None
    # Not OpenAI's, but vLLM's and transformers': the model card's sampling uses 1.03.
    repetition_penalty: float = Field(1.0, gt=0.0)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if "" in stops:
            raise APIError(400, "stop: a stop string must not be empty", param="stop")
        return tuple(stops)


class CompletionRequest(GenerationFields):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


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


class EmbeddingRequest(StrictModel):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


# ----- the app -----


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
    tokenizer = engine.tokenizer
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors()[0])
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": engine.stats_dict()}

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "teleflm"}
        return {"object": "list", "data": [card]}

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"model {name!r} does not exist (this server has {model_name!r})",
                "model",
                "model_not_found",
            )

    def sampling(prompt_ids: list[int], body: GenerationFields, max_tokens: int | None, param: str):
        """SamplingParams for one prompt, refusing prompts that do not fit the context."""
        context = engine.context
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
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_strings(),
            seed=body.seed,
            repetition_penalty=body.repetition_penalty,
        )

    @v1.post("/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: no prompt given", "prompt")
        if body.stream and len(prompts) > 1:
            raise APIError(400, "prompt: streaming takes one prompt", "prompt")
        jobs = []
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            jobs.append((ids, sampling(ids, body, body.max_tokens, "prompt")))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "model": model_name}
        head["created"] = int(time.time())

        def choice(text: str, finish_reason: str | None, index: int = 0) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

        if body.stream:
            events = stream_events(engine, *jobs[0], head, choice, None, include_usage(body))
            return StreamingResponse(events, media_type="text/event-stream")
        results = await asyncio.gather(*(complete(engine, ids, params) for ids, params in jobs))
        choices = [choice(text, reason, i) for i, (text, reason, _) in enumerate(results)]
        return {**head, "choices": choices, "usage": total_usage([usage for _, _, usage in results])}

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = prompt_ids(tokenizer, messages)
        except Exception as e:  # a chat template may refuse a conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template refused them: {e}", "messages") from None
        params = sampling(ids, body, body.max_completion_tokens or body.max_tokens, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "model": model_name, "created": int(time.time())}
        if body.stream:

            def delta(text: str, finish_reason: str | None) -> dict:
                return {
                    "index": 0,
                    "delta": {"content": text} if text else {},
                    "finish_reason": finish_reason,
                }

            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            head["object"] = "chat.completion.chunk"
            events = stream_events(engine, ids, params, head, delta, first, include_usage(body))
            return StreamingResponse(events, media_type="text/event-stream")
        text, reason, usage = await complete(engine, ids, params)
        message = {"role": "assistant", "content": text}
        choices = [{"index": 0, "message": message, "finish_reason": reason}]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

    @v1.post("/embeddings")
    async def embeddings(body: EmbeddingRequest):
        check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise APIError(400, "input: no text given", "input")
        counts = []
        for i, text in enumerate(texts):
            n = len(tokenizer(text)["input_ids"])
            if n == 0 or n > engine.context:
                problem = "is empty" if n == 0 else f"has {n} tokens; the context is {engine.context}"
                raise APIError(400, f"input[{i}] {problem}", "input")
            counts.append(n)
        vectors = await run_embedding(engine, texts)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": sum(counts), "total_tokens": sum(counts)}
        return {"object": "list", "data": data, "model": model_name, "usage": usage}

    app.include_router(v1)
    return app


def include_usage(body: GenerationFields) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def usage_of(output: Output) -> dict[str, int]:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
    }


def total_usage(usages: list[dict[str, int]]) -> dict[str, int]:
    return {key: sum(u[key] for u in usages) for key in usages[0]}


def encode_vector(vector, encoding_format: str):
    if encoding_format == "base64":  # what the openai client asks for: little-endian float32
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


# ----- bridging the engine thread and the event loop -----


async def outputs(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Output]:
    """The engine's outputs for one request, up to the one that finishes it. Leaving early (a client
    that went away cancels the task) cancels the request, which frees its slot in the batch."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Output] = asyncio.Queue()
    request = GenerationRequest(
        prompt_ids, params, lambda out: loop.call_soon_threadsafe(queue.put_nowait, out)
    )
    engine.submit(request)
    try:
        while True:
            output = await queue.get()
            yield output
            if output.finish_reason is not None:
                return
    finally:
        request.cancel()  # a no-op for a finished request


async def complete(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> tuple[str, str, dict]:
    """(text, finish_reason, usage) of a whole generation."""
    text = []
    async for output in outputs(engine, prompt_ids, params):
        text.append(output.text)
        if output.error:
            raise APIError(500, f"generation failed: {output.error}", kind="server_error")
    return "".join(text), output.finish_reason, usage_of(output)


async def stream_events(
    engine: Engine,
    prompt_ids: list[int],
    params: SamplingParams,
    head: dict,
    choice: Callable[[str, str | None], dict],
    first_choice: dict | None,
    with_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: `data: {chunk}` per piece of text, one with the finish reason, then a usage
    chunk if asked, then `data: [DONE]`."""

    def event(chunk: dict) -> str:
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    if first_choice is not None:
        yield event({**head, "choices": [first_choice]})
    async for output in outputs(engine, prompt_ids, params):
        if output.error:
            yield event(error_body(f"generation failed: {output.error}", "server_error"))
            break
        if output.text:
            yield event({**head, "choices": [choice(output.text, None)]})
        if output.finish_reason:
            yield event({**head, "choices": [choice("", output.finish_reason)]})
            if with_usage:
                yield event({**head, "choices": [], "usage": usage_of(output)})
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

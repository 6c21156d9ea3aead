"""The generation engine: one background thread owns the model and serves every request, batching all
running requests into one forward pass per decoding step (iteration-level, "continuous" batching).

Each step:
  1. drop cancelled requests, admit waiting ones (up to `max_batch` running);
  2. build one input chunk for the whole batch: a running request feeds its last sampled token, a
     newly admitted one its whole prompt; the chunk is as wide as the longest new prompt, and shorter
     rows are left-padded;
  3. one forward pass over the chunk with the batch's KV cache, per-row positions and a padding mask;
  4. sample each row's next token with its own parameters and random generator, check EOS, stop
     strings and max_tokens, and send the new text;
  5. drop finished rows from the cache, and compact it when some columns are padding in every row.

The KV cache (`BatchKVCache`) is shared by the batch: keys and values of shape
(batch, kv_heads, columns, head_dim) per layer, and a (batch, columns) mask of the columns that hold
a real token of that row. Rows line up by column, not by position: positions are per row and given
to RoPE explicitly, so a row's padding columns, wherever they lie, are simply masked out. A request
alone in the batch therefore runs exactly the computation of `model.generate`.

Embedding requests are served by the same thread between decoding steps, all waiting ones in one
call of `embed`.
"""

import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from teleflm.data.tokenizer import real_vocab_size
from teleflm.serve.constrain import Constraint, GrammarTokenizer
from teleflm.serve.embed import embed

log = logging.getLogger(__name__)


MAX_TOP_LOGPROBS = 20  # OpenAI's limit


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before temperature, penalty, top_p or a
    grammar reshape the distribution), and the most likely alternatives: (token id, log-probability)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None: a fresh random seed
    repetition_penalty: float = 1.0  # transformers' rule: positive logits divided, negative multiplied
    logprobs: int | None = None  # report each token's log-probability and this many top alternatives

    def __post_init__(self):
        if self.max_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need max_tokens >= 1, temperature >= 0 and top_p in (0, 1]: {self}")
        if self.repetition_penalty <= 0 or "" in self.stop:
            raise ValueError(f"need a positive repetition_penalty and non-empty stop strings: {self}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_TOP_LOGPROBS}: {self}")


@dataclass(frozen=True)
class Output:
    """What the engine sends a request after each step: the new text, and at the end the reason
    ("stop": EOS or a stop string, "length": max_tokens, "error": see `error`)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens generated since the previous output


class GenerationRequest:
    """One prompt being continued. `on_output` is called from the engine thread."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[Output], None],
        constraint: Constraint | None = None,
    ):
        """`constraint`: the grammar the output must follow (teleflm.serve.constrain), or None."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_output = on_output
        self.constraint = constraint
        self.pending_logprobs: list[TokenLogprob] = []  # not yet sent
        self.output_ids: list[int] = []
        self.position = 0  # tokens of this request in the cache so far
        self.sent_chars = 0  # how much of the completion text was sent
        self.prompt_text: str | None = None  # decoded by the engine on admission
        self.done = False
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator: torch.Generator | None = None  # made on the model's device on admission
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to stop and free the slot (a client went away); safe from any thread."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def fed_ids(self) -> list[int]:
        """What this request feeds the next forward pass: its prompt first, then its last token."""
        return self.prompt_ids if self.position == 0 else self.output_ids[-1:]


@dataclass
class EmbeddingJob:
    texts: list[str]
    on_done: Callable[[torch.Tensor | None, str | None], None]  # (vectors, error)


@dataclass
class EngineStats:
    """Counters that show what the engine did (served at /health)."""

    forward_passes: int = 0  # decoding steps: one forward pass each, for the whole batch
    generated_tokens: int = 0
    max_batch_seen: int = 0
    finished: int = 0
    cancelled: int = 0
    embedding_passes: int = 0  # calls of `embed`, each for every waiting embedding request
    embedded_texts: int = 0


class BatchKVCache:
    """Keys and values of the running batch, per layer (batch, kv_heads, columns, head_dim), and the
    (batch, columns) mask of real tokens. The model sees only `update` and `get_seq_length`, the part
    of transformers' Cache interface it uses."""

    def __init__(self, num_layers: int, device: torch.device):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.mask.shape[1]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def add_rows(self, n: int) -> None:
        """Rows for newly admitted requests: all their columns so far are padding."""
        if n == 0:
            return
        self.mask = torch.cat([self.mask, self.mask.new_zeros(n, self.mask.shape[1])])
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[layer] = torch.cat([k, k.new_zeros(n, *k.shape[1:])])
                self.values[layer] = torch.cat([v, v.new_zeros(n, *v.shape[1:])])

    def rows(self, rows: list[int]) -> "BatchKVCache":
        """A new cache with copies of these rows (this one is left as it is)."""
        other = BatchKVCache(len(self.keys), self.mask.device)
        other.mask, other.keys, other.values = self.mask, list(self.keys), list(self.values)
        other.keep_rows(rows)
        return other

    def keep_rows(self, rows: list[int]) -> None:
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask[index]
        self.keys = [k[index] if k is not None else None for k in self.keys]
        self.values = [v[index] if v is not None else None for v in self.values]
        if not rows:  # an empty batch starts over with no columns
            self.mask = self.mask[:, :0]
            self.keys = [None] * len(self.keys)
            self.values = [None] * len(self.values)

    def compact(self) -> None:
        """Move each row's real columns to the right end, in order, and cut the columns that are then
        padding in every row. Order is all causality needs: positions live in RoPE, not in columns."""
        longest = int(self.mask.sum(dim=1).max()) if self.mask.numel() else 0
        if longest == self.mask.shape[1]:
            return
        # A stable sort of 0/1 puts padding first and keeps the real columns in their order.
        index = torch.sort(self.mask, dim=1, stable=True).indices[:, self.mask.shape[1] - longest :]
        self.mask = self.mask.gather(1, index)
        for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            gather = index[:, None, :, None].expand(k.shape[0], k.shape[1], longest, k.shape[3])
            self.keys[layer], self.values[layer] = k.gather(2, gather), v.gather(2, gather)


class Engine:
    """Owns the model in one background thread (`start`/`stop`); `submit` and `submit_embedding` are
    safe from any thread. Tests may instead call `step` themselves without starting the thread."""

    def __init__(self, model, tokenizer, max_batch: int = 16, pooling: str = "mean", normalize: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.pooling, self.normalize = pooling, normalize
        self.context = model.config.max_position_embeddings
        self.real_vocab = real_vocab_size(tokenizer)
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.stats = EngineStats()
        self.running: list[GenerationRequest] = []
        self.cache = BatchKVCache(model.config.num_hidden_layers, model.device)
        self._waiting: deque[GenerationRequest] = deque()
        self._embedding_jobs: deque[EmbeddingJob] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._grammar_tokenizer: GrammarTokenizer | None = None

    def grammar_tokenizer(self) -> GrammarTokenizer:
        """For structured output; built on first use (about a second for a large vocabulary)."""
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = GrammarTokenizer(self.tokenizer, self.model.config.vocab_size)
        return self._grammar_tokenizer

    # ----- from any thread -----

    def submit(self, request: GenerationRequest) -> None:
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()

    def submit_embedding(self, job: EmbeddingJob) -> None:
        with self._wake:
            self._embedding_jobs.append(job)
            self._wake.notify()

    def load(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self._waiting)}

    def stats_dict(self) -> dict[str, int]:
        return {**asdict(self.stats), **self.load()}

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="teleflm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in [*self.running, *self._waiting]:
            self._finish(request, "error", error="the server is shutting down")
        self.running, self._waiting = [], deque()

    # ----- the engine thread -----

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._embedding_jobs or self.running):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.run_embedding_jobs()
                self.step()
            except Exception as e:  # a failed step fails its requests, never the server
                log.exception("engine step failed")
                for request in self.running:
                    self._finish(request, "error", error=f"{type(e).__name__}: {e}")
                self.running = []
                self.cache.keep_rows([])

    def run_embedding_jobs(self) -> None:
        with self._wake:
            jobs = list(self._embedding_jobs)
            self._embedding_jobs.clear()
        if not jobs:
            return
        texts = [text for job in jobs for text in job.texts]
        try:
            vectors, _ = embed(
                self.model, self.tokenizer, texts, self.pooling, self.normalize, batch_size=self.max_batch
            )
        except Exception as e:
            for job in jobs:
                job.on_done(None, f"{type(e).__name__}: {e}")
            return
        self.stats.embedding_passes += 1
        self.stats.embedded_texts += len(texts)
        start = 0
        for job in jobs:
            job.on_done(vectors[start : start + len(job.texts)], None)
            start += len(job.texts)

    def step(self) -> None:
        """One decoding step for every running request, admitting waiting ones first. A step that
        fails is undone and each row is tried alone: the rows that fail alone finish with the error,
        the others take their step (a batch that fails only together fails every row)."""
        self._drop_cancelled()
        admitted = self._admit()
        rows = self.running = self.running + admitted
        if not rows:
            return
        self.cache.add_rows(len(admitted))
        try:
            logits = self._forward(rows, self.cache)
        except Exception as e:
            if len(rows) == 1:
                raise
            log.warning("a batched step failed (%s: %s); trying each request alone", type(e).__name__, e)
            failed = {}
            for i in range(len(rows)):
                try:
                    self._forward([rows[i]], self.cache.rows([i]))
                except Exception as alone:
                    failed[i] = alone
            if not failed:
                raise
            for i, error in failed.items():
                self._finish(rows[i], "error", error=f"{type(error).__name__}: {error}")
            keep = [i for i in range(len(rows)) if i not in failed]
            rows = self.running = [rows[i] for i in keep]
            self.cache.keep_rows(keep)
            if not rows:
                return
            logits = self._forward(rows, self.cache)
        for request in rows:
            request.position += len(request.fed_ids())
        self.stats.forward_passes += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(rows))

        # The next tokens each grammar allows, computed for the whole batch at once.
        constrained = [request.constraint for request in rows if request.constraint is not None]
        allowed = iter(self.grammar_tokenizer().allowed(constrained).to(logits.device) if constrained else [])
        for i, request in enumerate(rows):
            grammar = next(allowed) if request.constraint is not None else None
            request.output_ids.append(self._sample(logits[i], request, grammar))
            self.stats.generated_tokens += 1
            self._send_text(request)
        keep = [i for i, request in enumerate(rows) if not request.done]
        if len(keep) < len(rows):
            self.running = [rows[i] for i in keep]
            self.cache.keep_rows(keep)
        self.cache.compact()

    def _forward(self, rows: list[GenerationRequest], cache: "BatchKVCache") -> torch.Tensor:
        """Last-position logits of one forward pass over `rows` with `cache` (which changes only
        when it succeeds); the rows' positions are the caller's to advance."""
        device = self.model.device
        width = max(len(r.fed_ids()) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        chunk_mask = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        for i, request in enumerate(rows):
            fed = request.fed_ids()
            input_ids[i, width - len(fed) :] = torch.tensor(fed)
            chunk_mask[i, width - len(fed) :] = 1
            positions[i, width - len(fed) :] = torch.arange(request.position, request.position + len(fed))
        mask = torch.cat([cache.mask, chunk_mask.to(device)], dim=1)
        keys, values = list(cache.keys), list(cache.values)
        try:
            with torch.no_grad():
                logits = self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=mask,
                    position_ids=positions.to(device),
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=1,
                ).logits[:, -1]
        except Exception:
            cache.keys, cache.values = keys, values  # layers that took the chunk give it back
            raise
        cache.mask = mask
        return logits

    def _drop_cancelled(self) -> None:
        keep = [i for i, request in enumerate(self.running) if not request.cancelled]
        self.stats.cancelled += len(self.running) - len(keep)
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            self.cache.keep_rows(keep)
            self.cache.compact()

    def _admit(self) -> list[GenerationRequest]:
        admitted = []
        with self._wake:
            while self._waiting and len(self.running) + len(admitted) < self.max_batch:
                request = self._waiting.popleft()
                if request.cancelled:
                    self.stats.cancelled += 1
                    continue
                admitted.append(request)
        for request in admitted:
            request.prompt_text = self.tokenizer.decode(request.prompt_ids, skip_special_tokens=True)
            request.generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
        return admitted

    def _sample(self, logits: torch.Tensor, request: GenerationRequest, allowed: torch.Tensor | None) -> int:
        """The next token of `request` from its row of logits; `allowed`: its grammar's mask."""
        token = self._choose(logits, request, allowed)
        if request.params.logprobs is not None:
            request.pending_logprobs.append(self._logprob(logits, token, request.params.logprobs))
        if request.constraint is not None:
            request.constraint.accept(token)
        return token

    def _logprob(self, logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
        logp = torch.log_softmax(logits[: self.real_vocab].float(), dim=-1)
        best = logp.topk(top) if top else None
        alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if top else ()
        return TokenLogprob(token, float(logp[token]), alternatives)

    def _choose(self, logits: torch.Tensor, request: GenerationRequest, allowed: torch.Tensor | None) -> int:
        params = request.params
        # A copy (for fp32 models too): the row stays as the model gave it, for the logprobs.
        logits = logits.to(torch.float32, copy=True)
        logits[self.real_vocab :] = -float("inf")  # embedding rows past the tokenizer: never emitted
        if allowed is not None:
            logits[~allowed] = -float("inf")
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(request.prompt_ids + request.output_ids, device=logits.device).unique()
            scores = logits[seen]
            logits[seen] = torch.where(
                scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty
            )
        if params.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            # Keep the most likely tokens until their mass reaches top_p (at least one).
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
            probs[order[outside]] = 0.0
        return int(torch.multinomial(probs, 1, generator=request.generator))

    def _send_text(self, request: GenerationRequest) -> None:
        """Decide whether the request is done and send the text that is safe to send: text that could
        still become a stop string, or an unfinished UTF-8 character, waits for the next token."""
        params = request.params
        full = self.tokenizer.decode(request.prompt_ids + request.output_ids, skip_special_tokens=True)
        text = full[len(request.prompt_text) :]
        stops = [(text.find(s), s) for s in params.stop if s in text]
        if stops:
            self._finish(request, "stop", text[: min(stops)[0]])
        elif request.output_ids[-1] in self.eos_ids or (request.constraint and request.constraint.finished):
            self._finish(request, "stop", text)  # EOS, or a grammar that is complete and cannot go on
        elif len(request.output_ids) >= params.max_tokens or request.position >= self.context:
            self._finish(request, "length", text)
        else:
            hold = max((len(s) - 1 for s in params.stop), default=0)
            safe = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
            safe = min(safe, len(text) - hold)
            if safe > request.sent_chars:
                request.on_output(
                    Output(
                        text[request.sent_chars : safe],
                        None,
                        *self._usage(request),
                        logprobs=self._take(request),
                    )
                )
                request.sent_chars = safe

    def _finish(
        self, request: GenerationRequest, reason: str, text: str = "", error: str | None = None
    ) -> None:
        request.done = True
        self.stats.finished += reason != "error"
        output = Output(
            text[request.sent_chars :],
            reason,
            *self._usage(request),
            error=error,
            logprobs=self._take(request),
        )
        request.on_output(output)

    @staticmethod
    def _take(request: GenerationRequest) -> tuple[TokenLogprob, ...]:
        taken, request.pending_logprobs = tuple(request.pending_logprobs), []
        return taken

    @staticmethod
    def _usage(request: GenerationRequest) -> tuple[int, int]:
        return len(request.prompt_ids), len(request.output_ids)

"""Structured output: the tokens a request may produce next, from a JSON schema, a regex or a Lark
grammar, through llguidance (a Rust library: no GPU, a mask for an 80k vocabulary in well under a
millisecond, and tokenizer-aware, so a token that spans several grammar symbols is allowed exactly
when its bytes fit).

JSON is generated without free whitespace between tokens (`whitespace_flexible = false`): a model
that was never trained on JSON would otherwise fill its budget with spaces and newlines, which the
grammar allows anywhere. A schema that bounds its strings and numbers (maxLength, enum, maximum...)
bounds the output; an unbounded one can still run into max_tokens (finish_reason "length").
"""

import json

import llguidance
import llguidance.hf
import llguidance.torch
import torch

JSON_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """A schema, regex or grammar that cannot be compiled; the message says why."""


def grammar_of(kind: str, spec) -> str:
    """llguidance's grammar for `kind` "json_object" (any object), "json_schema" (spec: the schema),
    "regex" (spec: a pattern) or "grammar" (spec: Lark text)."""
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind == "json_schema":
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec), overrides=JSON_OPTIONS)
        except ValueError as e:
            raise ConstraintError(f"not a JSON schema: {e}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(spec)
    raise ConstraintError(f"unknown constraint kind {kind!r}")


class GrammarTokenizer:
    """The tokenizer as llguidance sees it (built once per server: about a second for 80k tokens), and
    the executor that computes a batch's masks on its own threads."""

    def __init__(self, tokenizer, vocab_size: int):
        self.inner = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size
        self.executor = llguidance.LLExecutor()
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self, constraints: list["Constraint"]) -> torch.Tensor:
        """Bool (len(constraints), vocab_size): the tokens that keep each output inside its grammar,
        computed for the whole batch at once."""
        bitmask = llguidance.torch.allocate_token_bitmask(len(constraints), self.vocab_size)
        llguidance.torch.fill_next_token_bitmask_par(
            self.executor, [(c.matcher, i) for i, c in enumerate(constraints)], bitmask
        )
        bits = (bitmask[:, :, None] >> self._bits) & 1
        return bits.flatten(1)[:, : self.vocab_size].bool()

    def constraint(self, grammar: str) -> "Constraint":
        matcher = llguidance.LLMatcher(self.inner, grammar)
        if matcher.is_error():
            raise ConstraintError(matcher.get_error())
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One request's grammar state (`GrammarTokenizer.allowed` gives its next tokens)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def copy(self) -> "Constraint":
        return Constraint(self.matcher.deep_copy(), self.vocab_size)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ConstraintError(f"token {token} is outside the grammar: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and cannot go on (or ended with EOS)."""
        return self.matcher.is_stopped()

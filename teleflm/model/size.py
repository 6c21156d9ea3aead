"""How big a Tele-FLM is: exact parameter counts and training FLOPs per token, from its config alone
(nothing is built, so the 1T shape costs nothing)."""


def parameter_counts(c) -> dict[str, int]:
    """Exact parameter counts of a TeleFLMConfig (untied embedding and readout)."""
    d, hd = c.hidden_size, c.head_dim
    attention = d * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    if c.attention_bias:  # q, k, v and o biases
        attention += hd * (c.num_attention_heads + 2 * c.num_key_value_heads) + d
    layer = attention + 3 * d * c.intermediate_size + 2 * d
    counts = {
        "embedding": c.vocab_size * d,
        "layers": c.num_hidden_layers * layer,
        "final_norm": d,
        "readout": 0 if c.tie_word_embeddings else c.vocab_size * d,
    }
    counts["per_layer"] = layer
    counts["total"] = counts["embedding"] + counts["layers"] + counts["final_norm"] + counts["readout"]
    counts["non_embedding"] = counts["layers"] + counts["final_norm"]  # the N of scaling laws
    return counts


def flops_per_token(c, context_length: int) -> float:
    """Training FLOPs per token: 6 x the parameters every token multiplies (the non-embedding ones and
    the readout) + the attention term 12 x layers x width x context."""
    matmul = parameter_counts(c)["non_embedding"] + c.vocab_size * c.hidden_size
    return 6 * matmul + 12 * c.num_hidden_layers * c.hidden_size * context_length

"""Serving a model: text embeddings (`embed`), a batching generation engine and an OpenAI-compatible
HTTP API (`teleflm serve`)."""

"""teleflm: pre-train Tele-FLM style language models."""

__version__ = "0.1.0"

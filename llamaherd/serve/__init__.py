"""Serving: the engine (continuous batching over a paged KV cache) and the OpenAI-compatible API."""

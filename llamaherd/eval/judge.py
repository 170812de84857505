"""An LLM as a judge: a batch of chat conversations in, one reply each out, from a checkpoint llamaherd
loads (greedy decoding in the Llama 3 chat format) or from any OpenAI-compatible endpoint.

    judge = make_judge("runs/tiny")                      # or "http://localhost:8000/v1"
    replies = judge([[{"role": "user", "content": "Rate this: ..."}]])

``herd data annotate`` labels documents with one (data/curate/annotate.py); pairwise preference
evaluation will too.
"""

from __future__ import annotations

import os

from llamaherd.errors import HerdError


class CheckpointJudge:
    """Replies from a checkpoint: greedy, up to ``max_tokens`` new tokens, ending at a stop token. A
    conversation that does not fit the model's context gets an empty reply (no label)."""

    def __init__(self, path: str | os.PathLike, *, max_tokens: int = 8, device: str | None = None):
        import torch

        from llamaherd.checkpoint import load
        from llamaherd.generation import prepare_for_decoding
        from llamaherd.tokenizer import ChatFormat

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else None
        self.model, self.tokenizer = load(path, device=device, dtype=dtype)
        if self.tokenizer is None:
            raise HerdError(f"{path}: has no tokenizer files; a judge needs one")
        prepare_for_decoding(self.model)
        self.chat, self.max_tokens = ChatFormat(self.tokenizer), max_tokens

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        from llamaherd.generation import generate

        replies = []
        stops = set(self.tokenizer.stop_tokens)
        for messages in conversations:
            ids = self.chat.encode_dialog_prompt(messages)
            if len(ids) + 1 > self.model.args.max_seq_len:
                replies.append("")
                continue
            new = generate(self.model, [ids], max_new_tokens=self.max_tokens, stop_tokens=sorted(stops))[0]
            replies.append(self.tokenizer.decode([t for t in new if t not in stops]))
        return replies


class EndpointJudge:
    """Replies from an OpenAI-compatible endpoint (``base_url`` ending in /v1), through the official
    ``openai`` client: temperature 0, up to ``max_tokens``. ``model`` defaults to the endpoint's first."""

    def __init__(self, base_url: str, *, model: str | None = None, max_tokens: int = 8, api_key: str | None = None,
                 timeout: float = 120.0):
        try:
            import openai
        except ImportError:
            raise HerdError("a judge at a URL needs the openai package (pip install openai)") from None
        self.openai = openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                                    timeout=timeout, max_retries=2)
        self.base_url, self.max_tokens = base_url, max_tokens
        try:
            self.model = model or next(iter(self.client.models.list())).id
        except (openai.APIError, StopIteration) as e:
            raise HerdError(f"{base_url}: cannot list the endpoint's models ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no models'}); pass --judge-model") from None

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        replies = []
        for messages in conversations:
            try:
                response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                               max_tokens=self.max_tokens)
            except self.openai.APIError as e:
                raise HerdError(f"{self.base_url}: the judge failed ({type(e).__name__}: "
                                f"{(str(e).splitlines() or [''])[0][:200]})") from None
            replies.append(response.choices[0].message.content or "")
        return replies


def make_judge(spec: str, *, model: str | None = None, max_tokens: int = 8, device: str | None = None):
    """A judge from a URL (http:// or https://: an OpenAI-compatible endpoint) or a checkpoint path."""
    if spec.startswith(("http://", "https://")):
        return EndpointJudge(spec, model=model, max_tokens=max_tokens)
    return CheckpointJudge(spec, max_tokens=max_tokens, device=device)

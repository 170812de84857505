"""Log-likelihoods of continuations after a shared context, from a checkpoint or an OpenAI-compatible endpoint.

    scorer = ModelScorer(model, tokenizer)                 # or EndpointScorer("http://localhost:8000/v1")
    scorer.score(context, [" A", " B", " C", " D"])        # -> [(log p, is greedy), ...] one per continuation

Tokens as lm-evaluation-harness's ``hf`` model makes them, so that numbers compare: trailing spaces of the
context move to the continuation; the context is encoded alone, with the tokenizer's beginning-of-text
token, and each continuation is what encoding context + continuation whole adds after it.

A multiple-choice item's choices share their context, so ``ModelScorer`` reads it once: one row holds the
context and then every continuation, each continuation attending to the context and to itself only, at the
positions it would have right after the context (a boolean mask the model takes as it is). The harness runs
the context once per choice. Rows of several items are batched up to ``batch_tokens`` (padded) tokens.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import torch

from llamaherd.errors import HerdError

BOT = "<|begin_of_text|>"


def split_pairs(encode, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """(context ids, each continuation's ids) as the harness splits them; ``encode(text)`` adds what it adds
    (BOS). The context is encoded once; each continuation is what encoding context + continuation whole
    adds after it."""
    n = len(context) - len(context.rstrip())
    head, tail = (context[:-n], context[-n:]) if n else (context, "")
    ctx = encode(head)
    return ctx, [encode(head + tail + c)[len(ctx) :] for c in continuations]


def _bos(text: str) -> bool:
    """Whether encoding ``text`` adds <|begin_of_text|>: not when the text (a chat prompt) starts with it."""
    return not text.startswith(BOT)


def _cut(text: str, until: list[str]) -> str:
    """``text`` up to the first of the ``until`` strings."""
    ends = [i for i in (text.find(u) for u in until) if i >= 0]
    return text[: min(ends)] if ends else text


class ModelScorer:
    """Log-likelihoods from a model llamaherd loads, with its tokenizer; ``bos``: start with <|begin_of_text|>."""

    def __init__(self, model, tokenizer, *, batch_tokens: int = 8192, bos: bool = True):
        self.model, self.tokenizer, self.batch_tokens, self.bos = model.eval(), tokenizer, batch_tokens, bos
        self.device = next(model.parameters()).device
        self.max_len = model.args.max_seq_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=self.bos and _bos(text), allowed_special="all")

    def score(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        return self.score_many([(context, continuations)])[0]

    @torch.no_grad()
    def rolling_nll(self, ids: list[int]) -> float:
        """The negative log-likelihood (nats) of ``ids[1:]``, each token after the first predicted from what
        precedes it in its window: disjoint windows of the model's context, each starting from the previous
        one's last token (the harness's rolling log-likelihood)."""
        total, chunk = 0.0, 1024
        for s in range(0, len(ids) - 1, self.max_len):
            window = ids[s : s + self.max_len + 1]
            h = self.model(torch.tensor([window[:-1]], device=self.device), head=False)[0]
            target = torch.tensor(window[1:], device=self.device)
            for c in range(0, len(target), chunk):  # the output layer a slice at a time: a 128K vocabulary
                logits = self.model.output(h[c : c + chunk]).float()
                total += float(torch.nn.functional.cross_entropy(logits, target[c : c + chunk], reduction="sum"))
        return total

    @torch.no_grad()
    def generate_until(self, contexts: list[str], until: list[str], max_tokens: int, *, samples: int = 1,
                       temperature: float = 0.0, seed: int = 0, progress=None) -> list[list[str]]:
        """``samples`` continuations of each context (greedy when ``temperature`` is 0), each ending before the
        first of the ``until`` strings or at a stop token, after at most ``max_tokens`` tokens; special tokens
        are left out of the text (as the harness's ``hf`` model and vLLM decode). A context
        longer than the model's window less ``max_tokens`` is cut from the left, as the harness cuts it.
        Rows of similar length are decoded together; ``progress(done, total)`` after each batch."""
        from llamaherd.generation import generate

        room = self.max_len - max_tokens
        if room < 1:
            raise HerdError(f"max_tokens {max_tokens}: leaves no room for a prompt in the model's {self.max_len}")
        prompts = [self.encode(c)[-room:] for c in contexts]
        rows = [(i, s) for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) for s in range(samples)]
        marks = [u.encode() for u in until if u]
        special = self.tokenizer.bos_id  # the special tokens come last: left out of the text, as the harness does
        out: list[list[str]] = [[""] * samples for _ in contexts]
        start = 0
        while start < len(rows):
            n = max(1, min(64, self.batch_tokens // (len(prompts[rows[start][0]]) + max_tokens)))
            batch = rows[start : start + n]
            said = [b"" for _ in batch]

            def seen(row: int, token: int, said=said) -> bool:  # ends a row once it has written an until string
                piece = self.tokenizer.decode_bytes([token]) if token < special else b""
                said[row] += piece
                tail = said[row][-(max((len(m) for m in marks), default=0) + len(piece)) :]
                return any(m in tail for m in marks)

            new = generate(self.model, [prompts[i] for i, _ in batch], max_new_tokens=max_tokens,
                           temperature=temperature, seed=seed + start if temperature > 0 else None,
                           stop_tokens=self.tokenizer.stop_tokens, on_token=seen if marks else None)
            for (i, s), ids in zip(batch, new, strict=True):
                out[i][s] = _cut(self.tokenizer.decode([t for t in ids if t < special]), until)
            start += n
            if progress:
                progress(len({i for i, _ in rows[:start]}), len(contexts))
        return out

    def score_many(self, items: list[tuple[str, list[str]]]) -> list[list[tuple[float, bool]]]:
        """For each (context, continuations): one (log-probability, greedy?) per continuation."""
        rows = []
        for context, conts in items:
            ctx, conts_ids = split_pairs(self.encode, context, conts)
            if any(not c for c in conts_ids):
                raise HerdError(f"an empty continuation after context {context[-40:]!r}")
            room = self.max_len - sum(len(c) for c in conts_ids)
            if room < 1:
                raise HerdError(f"the continuations alone are longer than the model's {self.max_len} tokens")
            rows.append((ctx[-room:], conts_ids))  # the context cut from the left, as the harness cuts it
        out: list = [None] * len(rows)
        for prefix, members in _groups(rows):
            cache = _SharedPrefix(self.model, prefix, self.device) if prefix else None
            order = sorted(members, key=lambda i: -_row_len(rows[i], len(prefix)))
            start = 0
            while start < len(order):
                width = _row_len(rows[order[start]], len(prefix))
                n = max(1, min(len(order) - start, self.batch_tokens // max(width + len(prefix) // 4, 1)))
                batch = order[start : start + n]
                for i, result in zip(batch, self._forward([rows[i] for i in batch], width, cache), strict=True):
                    out[i] = result
                start += n
        return out

    @torch.no_grad()
    def _forward(self, rows, width: int, cache: _SharedPrefix | None) -> list[list[tuple[float, bool]]]:
        """Score rows (context, continuations) of at most ``width`` tokens after the shared prefix, if any."""
        b, skip = len(rows), (cache.length if cache else 0)
        tokens = torch.zeros(b, width, dtype=torch.long)
        positions = torch.zeros(b, width, dtype=torch.long)
        segment = torch.full((b, width), -1, dtype=torch.long)  # 0: the context; i + 1: continuation i; -1: pad
        picks, targets = [], []  # (row, position) predicting each continuation token, and that token
        for r, (ctx, conts) in enumerate(rows):
            rest = ctx[skip:]
            at = len(rest)
            tokens[r, :at] = torch.tensor(rest)
            positions[r, :at] = torch.arange(skip, len(ctx))
            segment[r, :at] = 0
            for i, c in enumerate(conts):
                tokens[r, at : at + len(c)] = torch.tensor(c)
                positions[r, at : at + len(c)] = torch.arange(len(ctx), len(ctx) + len(c))
                segment[r, at : at + len(c)] = i + 1
                # token j is predicted at the context's last position (j = 0) or at continuation token j - 1
                picks += [(r, len(rest) - 1)] + [(r, at + j) for j in range(len(c) - 1)]
                targets += c
                at += len(c)
            positions[r, at:] = torch.arange(width - at)  # padding: attends to itself only
        q, k = segment[:, :, None], segment[:, None, :]
        mask = torch.ones(width, width, dtype=torch.bool).tril() & ((k == 0) & (q >= 0) | (k == q))
        mask[:, torch.arange(width), torch.arange(width)] = True
        if cache is not None:  # every row sees the whole shared prefix first
            mask = torch.cat([torch.ones(b, width, skip, dtype=torch.bool), mask], dim=2)
        h = self.model(tokens.to(self.device), positions.to(self.device), mask=mask[:, None].to(self.device),
                       cache=cache, head=False)
        rows_at, cols_at = zip(*picks, strict=True)
        # the output layer only where a continuation token is predicted: with a 128K vocabulary it is most of
        # the work at every position
        logits = self.model.output(h[torch.tensor(rows_at), torch.tensor(cols_at)])
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        target = torch.tensor(targets)
        token_lp = logp.gather(-1, target[:, None])[:, 0]
        hit = logp.argmax(-1) == target
        results, i = [], 0
        for _, conts in rows:
            scores = []
            for c in conts:
                scores.append((float(token_lp[i : i + len(c)].sum()), bool(hit[i : i + len(c)].all())))
                i += len(c)
            results.append(scores)
        return results


MIN_SHARED = 32  # tokens: contexts that share fewer are scored without a shared prefix


def _groups(rows) -> list[tuple[list[int], list[int]]]:
    """(shared prefix ids, row indices): rows whose contexts start alike (the same few-shot examples), each
    group's prefix their longest common start, short of every context's last token."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    groups: list[tuple[list[int], list[int]]] = []
    for i in order:
        ctx = rows[i][0]
        if groups:
            prefix, members = groups[-1]
            n = _common(prefix, ctx)
            if n >= MIN_SHARED:
                groups[-1] = (prefix[: min(n, len(ctx) - 1)], members + [i])
                continue
        groups.append((ctx[: len(ctx) - 1], [i]))
    return [(p if len(p) >= MIN_SHARED and len(m) > 1 else [], m) for p, m in groups]


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _row_len(row, skip: int = 0) -> int:
    ctx, conts = row
    return len(ctx) - skip + sum(len(c) for c in conts)


class _SharedPrefix:
    """A KV cache in the model's protocol (``attend``) for rows that share a prefix: built by running the
    prefix once (causal, batch 1), it keeps every layer's keys and values; rows then attend to all of it and
    to themselves as their mask says. Nothing is written into it after that."""

    def __init__(self, model, prefix: list[int], device):
        self.length, self.kv, self.recording = len(prefix), {}, True
        model(torch.tensor([prefix], device=device), cache=self, head=False)
        self.recording = False

    def attend(self, layer: int, q, k, v, positions, mask):
        from llamaherd.model.transformer import attention

        if self.recording:
            self.kv[layer] = (k, v)
            return attention(q, k, v)
        pk, pv = self.kv[layer]
        b = q.shape[0]
        keys = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        return attention(q, keys, values, mask, causal=False)


class EndpointScorer:
    """Log-likelihoods from an OpenAI-compatible completions endpoint that tokenises (``POST /tokenize``, as
    ``herd serve`` and vLLM do) and echoes the prompt's log-probabilities (``echo``, ``logprobs``)."""

    def __init__(self, url: str, *, model: str | None = None, api_key: str | None = None, timeout: float = 600):
        self.base = url.rstrip("/").removesuffix("/completions").removesuffix("/v1")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_len = None  # the endpoint's context, once /tokenize has said it
        if self.model is None:
            models = self._call("/v1/models", None).get("data") or [{}]
            self.model = models[0].get("id", "default")

    def _call(self, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise HerdError(f"{self.base}{path}: HTTP {e.code}: {e.read().decode(errors='replace')[:200]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise HerdError(f"{self.base}{path}: cannot connect ({getattr(e, 'reason', e)})") from None

    def encode(self, text: str) -> list[int]:
        said = self._call("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": _bos(text)})
        self.max_len = said.get("max_model_len") or getattr(self, "max_len", None)
        return said["tokens"]

    def score(self, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
        return self.score_many([(context, continuations)])[0]

    def rolling_nll(self, ids: list[int]) -> float:
        """As ``ModelScorer.rolling_nll``, in windows of the server's context less one (``/tokenizer_info``)."""
        if not hasattr(self, "window"):
            info = self._call("/tokenizer_info", None)
            self.window = int(info.get("model_max_length") or 2048) - 1
        total = 0.0
        for s in range(0, len(ids) - 1, self.window):
            body = {"model": self.model, "prompt": ids[s : s + self.window + 1], "max_tokens": 0, "echo": True,
                    "logprobs": 0, "temperature": 0}
            lps = self._call("/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
            total -= sum(lps[1:])
        return total

    def generate_until(self, contexts: list[str], until: list[str], max_tokens: int, *, samples: int = 1,
                       temperature: float = 0.0, seed: int = 0, progress=None) -> list[list[str]]:
        """As ``ModelScorer.generate_until``, through /v1/completions: the prompt as token ids (tokenised by
        the endpoint, so special tokens read the same), ``stop`` the first four ``until`` strings (OpenAI's
        limit), each reply cut at the first of them all."""
        out = []
        for done, context in enumerate(contexts, 1):
            ids = self.encode(context)
            if self.max_len:
                ids = ids[-max(1, self.max_len - max_tokens) :]
            body = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": temperature,
                    "n": samples, "seed": seed, "skip_special_tokens": True}
            if until:
                body["stop"] = until[:4]
            choices = sorted(self._call("/v1/completions", body)["choices"], key=lambda c: c["index"])
            out.append([_cut(c["text"], until) for c in choices])
            if progress:
                progress(done, len(contexts))
        return out

    def score_many(self, items: list[tuple[str, list[str]]]) -> list[list[tuple[float, bool]]]:
        out = []
        for context, conts in items:
            ctx, conts_ids = split_pairs(self.encode, context, conts)
            pairs = [(ctx, c) for c in conts_ids]
            body = {"model": self.model, "prompt": [ctx + cont for ctx, cont in pairs], "max_tokens": 0,
                    "echo": True, "logprobs": 1, "temperature": 0}
            choices = sorted(self._call("/v1/completions", body)["choices"], key=lambda c: c["index"])
            scores = []
            for (ctx, cont), choice in zip(pairs, choices, strict=True):
                lp = choice["logprobs"]
                tail = range(len(ctx), len(ctx) + len(cont))
                total = sum(lp["token_logprobs"][i] for i in tail)
                greedy = all(max(lp["top_logprobs"][i], key=lp["top_logprobs"][i].get) == lp["tokens"][i] for i in tail)
                scores.append((float(total), greedy))
            out.append(scores)
        return out


def scorer_for(model: str, *, device=None, batch_tokens: int = 8192, api_key: str | None = None):
    """A ModelScorer for a checkpoint, an EndpointScorer for an http(s) URL."""
    from llamaherd.errors import HerdError
    from llamaherd.eval.loglik import EndpointScorer, ModelScorer

    if model.startswith(("http://", "https://")):
        return EndpointScorer(model, api_key=api_key)
    import torch

    from llamaherd.checkpoint import load

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m, tok = load(model, device=device, dtype=None if device.startswith("cuda") else torch.float32)
    if tok is None:
        raise HerdError(f"{model}: has no tokenizer files; evaluation needs one")
    return ModelScorer(m, tok, batch_tokens=batch_tokens)

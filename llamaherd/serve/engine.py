"""The serving engine: continuous batching over a paged KV cache, in one scheduler thread.

    engine = Engine(model, tokenizer, max_batch=16, kv_blocks=512)
    engine.start()
    request = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.0, stop=["\\n\\n"]))
    for event in request.stream():          # Event(token, text, logprob, top_logprobs), then finish_reason
        ...

Each turn of the loop admits waiting requests while there are batch rows and KV blocks for them (prefilled
together, left-padded, up to ``max_prefill_tokens`` padded tokens a forward, each getting its first token),
then runs one decode step for every running request together: requests join and leave the batch at token
granularity. A request ends at a stop token of the
model (``<|eot_id|>``, ``<|eom_id|>``, ``<|end_of_text|>``), at one of its ``stop`` strings (never sending
any part of it), at ``max_tokens``, when cancelled (a client gone) or past its deadline; its blocks go
back to the pool at once. Sampling is per request (temperature, top-p, top-k, seed): greedy rows are the
argmax of their own logits, as ``generate`` computes them.
"""

from __future__ import annotations

import codecs
import collections
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from llamaherd.errors import HerdError
from llamaherd.generation.decode import sample
from llamaherd.serve.paged import BlockPool


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # strings that end the output (not included)
    logprobs: int | None = None  # alternatives per generated token (0: the chosen token's logprob only)
    prompt_logprobs: bool = False  # the logprob of every prompt token after the first (``echo``)
    stop_tokens: bool = True  # end at the model's stop tokens
    skip_special_tokens: bool = False  # special tokens (other than stops) add no text


@dataclass
class Event:
    token: int | None = None
    text: str = ""  # what may be shown now (a stop string's possible start is held back)
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled", "timeout", "error"
    error: str | None = None


class Request:
    """One request's state, and the queue its events arrive on."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, deadline: float | None = None,
                 on_event: Callable[[Event], None] | None = None):
        self.id = next(self._ids)
        self.prompt, self.params, self.deadline = list(prompt), params, deadline
        self.output: list[int] = []
        self.table: list[int] = []
        self.prompt_logprobs: list[float | None] = []
        self.prompt_top: list[dict[int, float] | None] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.text = ""  # the output's text so far (what was sent, plus what is held back)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a cut character waits here
        self.sent = 0  # characters of ``text`` already sent
        self.first_token_at: float | None = None
        self.created = time.perf_counter()
        self._events: queue.Queue = queue.Queue()
        self._on_event = on_event
        self.done = threading.Event()

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def emit(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._events.put(event)
        if event.finish_reason is not None:
            self.done.set()

    def stream(self, timeout: float | None = None) -> Iterator[Event]:
        """The events, as they come, the last one with a finish reason (for callers without ``on_event``)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    """Continuous batching of requests over one model and a paged KV cache (see the module's docstring)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 16, kv_blocks: int = 1024, block_size: int = 16,
                 max_queue: int = 256, threads: int | None = 1, max_prefill_tokens: int = 2048,
                 compile: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        # with ``compile``: the model's forward through torch.compile with dynamic shapes (batch size, prompt
        # and cache lengths vary from step to step), compiled by ``start``'s warm-up, before any request
        self.forward = torch.compile(model.forward, dynamic=True) if compile else model.forward
        self.compiled = compile
        self.args = model.args
        param = next(model.parameters())
        self.device = param.device
        self.pool = BlockPool(self.args, kv_blocks, block_size, dtype=param.dtype, device=self.device)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_prefill_tokens = max_prefill_tokens  # padded prompt tokens in one prefill forward
        # CPU threads of the engine's own thread. One by default: torch's OpenMP team run from a second Python
        # thread was 2x slower with two threads than with one on a 2-core machine (docs/serving.md), and on a
        # small model batching pays more than threads
        self.threads = threads
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.stop_ids = set(tokenizer.stop_tokens)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False
        # counters for /metrics
        self.stats = collections.Counter()
        self.batch_sizes: collections.Counter = collections.Counter()  # decode steps by rows
        self.prefill_sizes: collections.Counter = collections.Counter()  # prefill forwards by rows
        self.observers: list[Callable[[str, float], None]] = []  # (name, seconds): ttft, itl

    # --- the public side -------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the loop's thread; with ``compile``, return once it has warmed up (compiled) there, with the
        thread count it runs with (a compiled forward is specific to it)."""
        started: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, args=(started,), name="herd-engine", daemon=True)
        self._thread.start()
        error = started.get()
        if error is not None:
            self._thread.join()
            raise error
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop; with ``drain``, once every running and waiting request has finished."""
        self.draining = True
        if drain:
            t0 = time.perf_counter()
            while (self.running or self.waiting) and (timeout is None or time.perf_counter() - t0 < timeout):
                time.sleep(0.01)
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def warmup(self) -> None:
        """Run the shapes a server meets (prefill and decode, one row and several) once, through blocks taken
        and given back: a compiled forward compiles here rather than on a client's first request."""
        n = 5  # sizes unlike one another (a compiler gives equal sizes one symbol, then guards them equal)
        with torch.no_grad():
            for rows in (1, 3):
                tables = [self.pool.allocate(n + 1) for _ in range(rows)]
                if any(t is None for t in tables):
                    raise HerdError("the KV cache is too small to warm up: give it more blocks")
                tokens = torch.zeros(rows, n, dtype=torch.long, device=self.device)
                positions = torch.arange(n, device=self.device).repeat(rows, 1)
                self.forward(tokens, positions, cache=self.pool.view(tables, [n] * rows, positions), last_only=True)
                # new tensors, as the engine passes (a view's strides and base are guarded too)
                token, step = torch.zeros(rows, 1, dtype=torch.long, device=self.device), positions[:, :1] + n
                self.forward(token, step, cache=self.pool.view(tables, [n + 1] * rows, step))
                for t in tables:
                    self.pool.free(t)

    def max_context(self) -> int:
        return min(self.args.max_seq_len, self.pool.n_blocks * self.pool.block_size)

    def submit(self, prompt: list[int], params: SamplingParams, *, timeout: float | None = None,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request; ``HerdError`` when the queue is full or the request can never fit."""
        if not prompt:
            raise HerdError("the prompt is empty: expected at least one token")
        if len(prompt) + params.max_tokens > self.max_context():
            raise HerdError(f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} is more than the "
                            f"{self.max_context()} tokens a request can hold")
        if self.draining:
            raise QueueFull("the server is shutting down")
        deadline = time.perf_counter() + timeout if timeout else None
        request = Request(prompt, params, deadline, on_event)
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.running)} requests running and {len(self.waiting)} waiting: "
                                "the queue is full")
            self.waiting.append(request)
            self.stats["requests"] += 1
            self._wake.notify()
        return request

    # --- the loop ----------------------------------------------------------------------------------------

    def _loop(self, started: queue.Queue) -> None:
        if self.threads and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            if self.compiled:
                self.warmup()
        except Exception as e:
            started.put(e)
            return
        started.put(None)
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.running:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                with torch.no_grad():
                    self._turn()
            except Exception as e:  # never a dead engine: fail the requests of this turn, keep serving
                for r in list(self.running):
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")

    def _turn(self) -> None:
        now = time.perf_counter()
        for r in list(self.running):
            if r.cancelled or (r.deadline is not None and now > r.deadline):
                self._finish(r, "cancelled" if r.cancelled else "timeout")
        # admit
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            if r.cancelled:
                self.waiting.popleft()
                self._finish(r, "cancelled")
                continue
            if self.pool.allocate(len(r.prompt) + 1, r.table) is None:
                break  # no blocks: wait for running requests to finish
            self.waiting.popleft()
            self.running.append(r)
            admitted.append(r)
        for group in self._prefill_groups(admitted):
            self._prefill(group)
        live = [r for r in self.running if r.finish_reason is None]
        if not live:
            return
        # one decode step for every running request
        for r in live:
            if self.pool.allocate(r.length, r.table) is None:
                self._finish(r, "length", error="the KV cache is full")
        live = [r for r in live if r.finish_reason is None]
        if not live:
            return
        self.batch_sizes[len(live)] += 1
        tokens = torch.tensor([[r.output[-1]] for r in live], device=self.device)
        positions = torch.tensor([[r.length - 1] for r in live], device=self.device)
        cache = self.pool.view([r.table for r in live], [r.length for r in live], positions)
        logits = self.forward(tokens, positions, mask=None, cache=cache)[:, -1]
        greedy = logits.argmax(dim=-1).tolist()  # every greedy row's token at once
        for r, row, best in zip(live, logits, greedy, strict=True):
            self._next(r, row, best if r.params.temperature <= 0 else None)

    def _prefill_groups(self, requests: list[Request]) -> Iterator[list[Request]]:
        """Requests to prefill together: by prompt length, at most ``max_prefill_tokens`` padded tokens a group;
        alone, a request that wants its prompt's logprobs (its logits at every position)."""
        group: list[Request] = []
        for r in sorted(requests, key=lambda r: len(r.prompt)):
            if r.params.prompt_logprobs:
                yield [r]
                continue
            if group and (len(group) + 1) * len(r.prompt) > self.max_prefill_tokens:
                yield group
                group = []
            group.append(r)
        if group:
            yield group

    def _prefill(self, group: list[Request]) -> None:
        """One forward over the prompts of ``group`` (left-padded to the longest), and each one's first token."""
        width = max(len(r.prompt) for r in group)
        self.prefill_sizes[len(group)] += 1
        tokens = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in group], device=self.device)
        positions = torch.tensor([[-1] * (width - len(r.prompt)) + list(range(len(r.prompt))) for r in group],
                                 device=self.device)
        cache = self.pool.view([r.table for r in group], [len(r.prompt) for r in group], positions)
        echo = group[0].params.prompt_logprobs  # then the group is that one request
        logits = self.forward(tokens, positions, mask=None, cache=cache, last_only=not echo)
        if echo:
            r, n = group[0], width
            logp = torch.log_softmax(logits[0].float(), dim=-1)
            r.prompt_logprobs = [None] + [float(logp[i, r.prompt[i + 1]]) for i in range(n - 1)]
            k = r.params.logprobs or 0
            r.prompt_top = [None] + [_top(logp[i], k) for i in range(n - 1)]
        last = logits[:, -1]
        greedy = last.argmax(dim=-1).tolist()
        for r, row, best in zip(group, last, greedy, strict=True):
            self.stats["prompt_tokens"] += len(r.prompt)
            self._next(r, row, best if r.params.temperature <= 0 else None)

    def _next(self, r: Request, logits: torch.Tensor, token: int | None = None) -> None:
        """Sample request ``r``'s next token from its ``logits`` [vocab] (or take ``token``, already chosen);
        send what can be sent; finish it?"""
        p = r.params
        if token is None:
            token = int(sample(logits[None], p.temperature, p.top_p, p.top_k, r.generator)[0])
        logprob = top = None
        if p.logprobs is not None:
            logp = torch.log_softmax(logits.float(), dim=-1)
            logprob, top = float(logp[token]), _top(logp, p.logprobs)
        now = time.perf_counter()
        if r.first_token_at is None:
            r.first_token_at = now
            self._observe("ttft", now - r.created)
        else:
            self._observe("itl", now - r.last_token_at)
        r.last_token_at = now
        self.stats["generation_tokens"] += 1
        if p.stop_tokens and token in self.stop_ids:
            self._finish(r, "stop")
            return
        r.output.append(token)
        if not (p.skip_special_tokens and token >= self.tokenizer.bos_id):  # the special tokens come last
            r.text += r._utf8.decode(self.tokenizer.decode_bytes([token]))
        cut, hold = _stop_search(r.text, p.stop, r.sent)
        if cut is not None:
            delta = r.text[r.sent:cut]
            r.sent = cut
            r.emit(Event(token, delta, logprob, top))
            self._finish(r, "stop", rest=False)
            return
        delta = r.text[r.sent:len(r.text) - hold]
        r.sent += len(delta)
        r.emit(Event(token, delta, logprob, top))
        if len(r.output) >= p.max_tokens:
            self._finish(r, "length")

    def _finish(self, r: Request, reason: str, error: str | None = None, rest: bool = True) -> None:
        """End ``r``: its blocks back to the pool, and what was held back sent (all of the output's text,
        a last partial character included), unless a stop string cut it."""
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        if r in self.running:
            self.running.remove(r)
        self.pool.free(r.table)
        rest = (r.text + r._utf8.decode(b"", final=True))[r.sent:] if rest else ""
        r.sent += len(rest)
        r.emit(Event(text=rest, finish_reason=reason, error=error))
        self.stats[f"finished_{reason}"] += 1

    def _observe(self, name: str, seconds: float) -> None:
        for fn in self.observers:
            fn(name, seconds)


class QueueFull(HerdError):
    """The engine takes no more requests for now (429)."""


def _top(logp: torch.Tensor, k: int) -> dict[int, float]:
    if k <= 0:
        return {}
    values, ids = logp.topk(k)
    return {int(i): float(v) for i, v in zip(ids, values, strict=True)}


def _stop_search(text: str, stops: list[str], sent: int) -> tuple[int | None, int]:
    """(where the first stop string starts, or None; how many trailing characters might begin one)."""
    if not stops:
        return None, 0
    first = None
    for s in stops:
        i = text.find(s, max(0, sent - len(s) + 1))
        if i != -1 and (first is None or i < first):
            first = i
    if first is not None:
        return first, 0
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return None, min(hold, len(text) - sent)

"""Moderation inside `herd serve`: a Llama Guard model on requests and responses, Code Shield on responses.

    herd serve runs/tiny --guard runs/guard --guard-on input,output --code-shield block

The guard checks each request's conversation (its user and assistant turns; system messages are the
operator's, not the user's) before it is queued, and each response as the last turn of its conversation.
Checks wait in one queue and a worker thread reads all that are waiting in one padded forward of the guard
(``Guard.scores``), so that concurrent requests share the guard's work; the guard writes its answer (the
categories) only for what it flags. Code Shield (``llamaherd.safety.scan_code``) scans each response:
``block`` filters a response whose recommended treatment is "block", ``warn`` adds its issues to the
response and filters nothing.

A flagged request or response is answered with ``finish_reason: "content_filter"``, no text, and a
``content_filter`` object saying what was found: ``{"stage": "input" | "output", "guard": {"score",
"categories"}, "code_shield": {"issues", "recommended_treatment"}}``. A request too long for the guard to read
is a 400; a reply that makes the conversation too long for it is filtered (``"guard": {"error": ...}``), as
what cannot be checked is not sent. A streamed response is held back and
released in chunks only after the text so far has passed the checks, so no flagged text reaches the client.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future

from llamaherd.errors import HerdError

STAGES = ("input", "output")
CODE_SHIELD = ("block", "warn", "off")


def guard_conversation(messages: list[dict]) -> list[dict]:
    """The turns a guard reads: user and assistant messages (system and tool ones left out), consecutive
    messages of one role joined, starting with a user's."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role not in ("user", "assistant") or not isinstance(m.get("content"), str):
            continue
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append({"role": role, "content": m["content"]})
    while out and out[0]["role"] != "user":
        out.pop(0)
    return out


class Guardrails:
    """The checks a server runs; ``stats`` for /metrics. ``guard`` is a ``llamaherd.safety.guard.Guard`` (or
    None: Code Shield alone)."""

    def __init__(self, guard=None, *, on: tuple[str, ...] = STAGES, code_shield: str = "off"):
        if code_shield not in CODE_SHIELD:
            raise HerdError(f"--code-shield {code_shield!r}: expected one of {', '.join(CODE_SHIELD)}")
        bad = [s for s in on if s not in STAGES]
        if bad or not on:
            raise HerdError(f"--guard-on {','.join(on)!r}: expected input, output or input,output")
        self.guard, self.on, self.code_shield = guard, set(on) if guard is not None else set(), code_shield
        self.stats: Counter = Counter()  # guard_<stage>_<verdict>, code_shield_<treatment>
        self.batch_sizes: Counter = Counter()
        self.seconds: list[float] = []  # guard batch latencies, for /metrics (kept short)
        self._queue: queue.Queue = queue.Queue()
        if guard is not None:
            threading.Thread(target=self._work, name="herd-guard", daemon=True).start()

    @property
    def active(self) -> bool:
        return bool(self.on) or self.code_shield != "off"

    def _work(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # everything waiting now goes into one forward of the guard
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            t0 = time.perf_counter()
            try:
                results = self.guard.classify_many([conv for conv, _ in items], answer=False)
            except Exception as e:  # a guard that fails fails its requests, never the server
                for _, future in items:
                    future.set_exception(e)
                continue
            self.batch_sizes[len(items)] += 1
            self.seconds = (self.seconds + [time.perf_counter() - t0])[-1000:]
            for (_, future), result in zip(items, results, strict=True):
                future.set_result(result)

    async def _guard(self, stage: str, conversation: list[dict]) -> dict | None:
        """The guard's finding when it flags ``conversation``, else None."""
        if stage not in self.on or not conversation:
            return None
        n = len(self.guard.prompt_ids(conversation))
        if n > self.guard.room():
            self.stats[f"guard_{stage}_too long"] += 1
            message = (f"the conversation makes a guard prompt of {n} tokens; the guard reads at most "
                       f"{self.guard.room()}")
            if stage == "input":  # the client's request: a 400 that says so
                from llamaherd.serve.api import ApiError

                raise ApiError(400, message + " (shorten the conversation)", "messages")
            return {"score": None, "categories": [], "error": message}  # a reply that cannot be checked is held
        future: Future = Future()
        self._queue.put((conversation, future))
        result = await asyncio.wrap_future(future)
        self.stats[f"guard_{stage}_{result['verdict']}"] += 1
        if result["verdict"] == "unsafe":
            return {"score": result["score"], "categories": result["categories"]}
        return None

    async def check_input(self, messages: list[dict]) -> dict | None:
        """A ``content_filter`` object when the request must be refused, else None."""
        found = await self._guard("input", guard_conversation(messages))
        return {"stage": "input", "guard": found} if found else None

    async def check_output(self, messages: list[dict], text: str) -> tuple[dict | None, dict | None]:
        """(a ``content_filter`` object when the response must be filtered, Code Shield's warning to attach
        when it only warns), for ``text`` as the reply to ``messages``."""
        scan = None
        if self.code_shield != "off" and text.strip():
            from llamaherd.safety import scan_code

            result = await asyncio.to_thread(scan_code, text)
            self.stats[f"code_shield_{result['recommended_treatment']}"] += 1
            if result["is_insecure"]:
                scan = {"issues": result["issues"], "recommended_treatment": result["recommended_treatment"]}
        if scan and self.code_shield == "block" and scan["recommended_treatment"] == "block":
            return {"stage": "output", "guard": None, "code_shield": scan}, None
        conversation = guard_conversation([*messages, {"role": "assistant", "content": text}])
        found = await self._guard("output", conversation) if text.strip() else None
        if found:
            return {"stage": "output", "guard": found, **({"code_shield": scan} if scan else {})}, None
        return None, ({"code_shield": scan} if scan else None)

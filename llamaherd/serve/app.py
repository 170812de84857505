"""Starting a server: load the checkpoint, start the engine, serve the API with uvicorn.

    serve("runs/tiny", port=8000)                        # what `herd serve` runs (blocks until SIGTERM)
    with running_server(model, tokenizer) as url: ...    # a server on a free loopback port, in a thread
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from llamaherd.errors import HerdError


def _need_serve_extra():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise HerdError(f"herd serve needs the serve extra (pip install 'llamaherd[serve]'): {e}") from None


def engine_for(model, tokenizer, *, max_batch: int = 16, max_queue: int = 256, kv_blocks: int = 1024,
               block_size: int = 16, threads: int | None = 1, compile: bool = False):
    """A started engine for ``model`` (compiled and warmed up first, with ``compile``)."""
    from llamaherd.serve.engine import Engine

    if tokenizer is None:
        raise HerdError("this checkpoint has no tokenizer: a server needs one (tokenizer.model beside the weights)")
    return Engine(model, tokenizer, max_batch=max_batch, kv_blocks=kv_blocks, block_size=block_size,
                  max_queue=max_queue, threads=threads, compile=compile).start()


def build(model, tokenizer, name: str = "llamaherd", *, api_key: str | None = None,
          max_prompt_tokens: int | None = None, max_total_tokens: int | None = None, timeout: float | None = 600.0,
          guardrails=None, **engine_options):
    """(the FastAPI app, its engine, started) for ``model`` and ``tokenizer``; ``guardrails`` a
    ``serve.guardrails.Guardrails`` moderating requests and responses."""
    _need_serve_extra()
    from llamaherd.serve.api import create_app

    engine = engine_for(model, tokenizer, **engine_options)
    app = create_app(engine, name, api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                     max_total_tokens=max_total_tokens, request_timeout=timeout, guardrails=guardrails)
    return app, engine


def guardrails_for(guard: str | None, *, on=("input", "output"), code_shield: str = "off", threshold: float = 0.5,
                   version: int | None = None, device=None):
    """The server's moderation: a guard checkpoint (its prompt's version and taxonomy as ``herd guard train``
    recorded them, else Llama Guard 2's) and Code Shield; None when neither is asked for."""
    from llamaherd.serve.guardrails import Guardrails

    if guard is None and code_shield == "off":
        return None
    model = None
    if guard is not None:
        from llamaherd.safety.guard import Guard
        from llamaherd.safety.guard_train import guard_settings

        found = guard_settings(guard) or {}
        model = Guard(guard, version=version or found.get("version", 2), categories=found.get("categories"),
                      threshold=threshold, device=device)
    return Guardrails(model, on=tuple(on), code_shield=code_shield)


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, dtype=None, device=None,
          quant: str | None = None, group_size: int | None = None, name: str | None = None,
          api_key: str | None = None, max_prompt_tokens: int | None = None,
          max_total_tokens: int | None = None, timeout: float | None = 600.0, guard: dict | None = None,
          **engine_options) -> None:
    """Serve ``checkpoint`` until SIGTERM / Ctrl-C (running requests finish first). The server listens at once
    (``/health`` answers 503) and loads the model (``generation.load_for_decoding``: ``dtype``, ``quant`` int8 / int4
    weight-only with ``group_size``) and compiles it (with ``compile``) meanwhile; then 200.
    ``guard``: ``guardrails_for``'s keyword arguments (the guard is loaded before the server is ready)."""
    _need_serve_extra()
    import logging

    import torch
    import uvicorn

    from llamaherd.checkpoint import resolve
    from llamaherd.generation import load_for_decoding
    from llamaherd.serve.api import create_app

    path = resolve(checkpoint)
    if not Path(path).is_dir():  # a missing checkpoint: a one-line error before anything starts
        raise HerdError(f"{checkpoint}: checkpoint directory not found")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    app = create_app(None, name or Path(path).name, api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                     max_total_tokens=max_total_tokens, request_timeout=timeout)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30))
    loaded: dict = {}
    log = logging.getLogger("uvicorn.error")

    def load_model():
        try:
            t0 = time.perf_counter()
            model, tokenizer = load_for_decoding(checkpoint, device=device, dtype=dtype, quant=quant,
                                                 group_size=group_size)
            if guard:
                app.state.server.guardrails = guardrails_for(**guard, device=device)
            engine = loaded["engine"] = engine_for(model, tokenizer, **engine_options)
            app.state.server.attach(engine)
            log.info("model %s ready in %.1f s%s", app.state.server.model_name, time.perf_counter() - t0,
                     " (compiled)" if engine.compiled else "")
        except Exception as e:  # the server stops; the error reaches the command line as one line
            loaded["error"] = e
            server.should_exit = True

    threading.Thread(target=load_model, name="herd-load", daemon=True).start()
    try:
        server.run()  # SIGTERM / SIGINT: stop accepting, let open requests finish
    finally:
        if "engine" in loaded:
            loaded["engine"].stop(drain=True, timeout=30)
    if "error" in loaded:
        e = loaded["error"]
        raise e if isinstance(e, HerdError) else HerdError(f"loading {checkpoint} failed: {type(e).__name__}: {e}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model, tokenizer, name: str = "llamaherd", **options):
    """A server for ``model`` on a free loopback port, in a thread; yields its base URL (``http://...:port``)."""
    import uvicorn

    app, engine = build(model, tokenizer, name, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    while not server.started:
        if time.perf_counter() - t0 > 30:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app, engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.stop(drain=False)

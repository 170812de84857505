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


def build(model, tokenizer, name: str = "llamaherd", *, max_batch: int = 16, max_queue: int = 256,
          kv_blocks: int = 1024, block_size: int = 16, api_key: str | None = None, threads: int | None = 1,
          max_prompt_tokens: int | None = None, max_total_tokens: int | None = None, timeout: float | None = 600.0):
    """(the FastAPI app, its engine, started) for ``model`` and ``tokenizer``."""
    _need_serve_extra()
    from llamaherd.serve.api import create_app
    from llamaherd.serve.engine import Engine

    if tokenizer is None:
        raise HerdError("this checkpoint has no tokenizer: a server needs one (tokenizer.model beside the weights)")
    engine = Engine(model, tokenizer, max_batch=max_batch, kv_blocks=kv_blocks, block_size=block_size,
                    max_queue=max_queue, threads=threads).start()
    app = create_app(engine, name, api_key=api_key, max_prompt_tokens=max_prompt_tokens,
                     max_total_tokens=max_total_tokens, request_timeout=timeout)
    app.state.server.ready = True
    return app, engine


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, dtype=None, device=None,
          name: str | None = None, **options) -> None:
    """Load ``checkpoint`` and serve it until SIGTERM / Ctrl-C (running requests finish first)."""
    _need_serve_extra()
    import torch
    import uvicorn

    from llamaherd.checkpoint import load, resolve

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load(checkpoint, device=device, dtype=dtype)
    app, engine = build(model, tokenizer, name or Path(resolve(checkpoint)).name, **options)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    try:
        server.run()  # SIGTERM / SIGINT: stop accepting, let open requests finish
    finally:
        engine.stop(drain=True, timeout=30)


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

"""Trust and safety: Llama Guard moderation (``guard.py``), Code Shield (``codeshield.py``), CyberSecEval
runners, and the guardrails of ``herd serve``.

    from llamaherd.safety import guard_prompt, scan_code
    guard_prompt([{"role": "user", "content": "..."}], version=2)    # the Llama Guard 2 prompt, byte for byte
    scan_code("import os\\nos.system(cmd)")                           # {"is_insecure", "issues", ...}
"""

from __future__ import annotations

_EXPORTS = {"guard_prompt": "llamaherd.safety.guard", "scan_code": "llamaherd.safety.codeshield"}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llamaherd.safety' has no attribute {name!r}")


__all__ = list(_EXPORTS)

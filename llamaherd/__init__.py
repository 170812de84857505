"""llamaherd: the Meta Llama 3 system on PyTorch.

    >>> import llamaherd
    >>> model, tokenizer = llamaherd.load("path/to/checkpoint")
    >>> ids = tokenizer.encode("The capital of France is", bos=True, eos=False)
    >>> new = llamaherd.generate(model, [ids], max_new_tokens=16)
    >>> print(tokenizer.decode(new[0]))
"""

__version__ = "0.1.0"

_LAZY = {
    "ModelArgs": "llamaherd.model.args",
    "Transformer": "llamaherd.model.transformer",
    "Tokenizer": "llamaherd.tokenizer",
    "ChatFormat": "llamaherd.tokenizer",
    "load": "llamaherd.checkpoint",
    "save": "llamaherd.checkpoint",
    "generate": "llamaherd.generation",
    "prepare_for_decoding": "llamaherd.generation",
    "HerdError": "llamaherd.errors",
}

__all__ = list(_LAZY)


def __getattr__(name):  # imports on first use keep `import llamaherd` and `herd --help` fast
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamaherd' has no attribute {name!r}")

"""Generation: sampling, the decode loop, compiled decode steps and the KV cache they run over.

    >>> model = prepare_for_decoding(model)          # optional: the fastest weight order for this device
    >>> new = generate(model, [ids], max_new_tokens=64, temperature=0.8, stop_tokens=tok.stop_tokens)

One generation path serves ``herd generate`` / ``herd chat``, the main job's samples, and the stages
to come (rejection sampling, evaluation, the server). See docs/generation.md.
"""

from llamaherd.generation.cache import StaticKVCache, grouped_decode_attention
from llamaherd.generation.compiled import clear_cache, kept_cache
from llamaherd.generation.decode import generate, load_for_decoding, prepare_for_decoding, sample

__all__ = ["StaticKVCache", "clear_cache", "generate", "grouped_decode_attention", "kept_cache",
           "load_for_decoding", "prepare_for_decoding", "sample"]

"""Shared fixtures: Meta's real tokenizer file, a small tokenizer, tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models are many times faster so on a busy small machine,
    where a second thread mostly waits for a core. Use it with ``pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def meta_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model, as shipped in the llama-models package (128,000 ranks)."""
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        pytest.skip("llama-models does not ship llama3/tokenizer.model")
    return path


@pytest.fixture(scope="session")
def meta_tokenizer(meta_tokenizer_path):
    """Our Tokenizer on Meta's file: 128,256 ids."""
    from llamaherd.tokenizer import Tokenizer

    return Tokenizer.from_file(meta_tokenizer_path)


SMALL_MERGES = [b"th", b"he", b"the", b" t", b"in", b"an", b"er", b"on"]


@pytest.fixture(scope="session")
def small_tokenizer():
    """256 byte ranks + 8 merges + the 256 Llama 3 special tokens: 520 ids."""
    from llamaherd.tokenizer import Tokenizer

    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({tok: 256 + i for i, tok in enumerate(SMALL_MERGES)})
    return Tokenizer.from_ranks(ranks)


def tiny_model_args(**overrides):
    """A tiny Llama: dim 64, 2 layers, 8 heads / 2 KV heads, vocab 520 (``small_tokenizer``'s size)."""
    from llamaherd.model.args import ModelArgs

    base = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=520, multiple_of=32, max_seq_len=128)
    return ModelArgs(**{**base, **overrides})


@pytest.fixture
def tiny_args():
    return tiny_model_args()


@pytest.fixture
def make_tiny_model():
    """``make_tiny_model(seed=0, **ModelArgs overrides)`` -> a Transformer with seeded random weights
    (norm weights random as well), in eval mode."""
    from llamaherd.model.transformer import Transformer

    def make(seed: int = 0, **overrides):
        import torch

        model = Transformer(tiny_model_args(**overrides))
        model.init_weights(seed=seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:  # norms too, so that a swapped or dropped norm weight shows
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def byte_corpus(tmp_path_factory) -> Path:
    """A byte-level tokenizer and packed train/val sets made from a slice of the stdlib corpus."""
    from llamaherd.data.pack import pack_documents
    from llamaherd.data.stdlib_corpus import stdlib_documents
    from llamaherd.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("byte_corpus")
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    tok.save(root / "tokenizer.model")
    for split, cap in (("train", 120_000), ("val", 20_000)):
        texts = [d.text for d in stdlib_documents(split, max_bytes=cap)]
        pack_documents(texts, tok, root / split, progress=False)
    return root

"""A quantised model in the serving engine: continuous batching and the paged KV cache run over Int8Linear /
Int4Linear as over nn.Linear, and each request gets what generate() gives the same quantised model alone."""

import copy

import pytest
import torch

from llamaherd.generation import generate
from llamaherd.model import Transformer, preset
from llamaherd.model.quant import quantize
from llamaherd.serve.engine import Engine, SamplingParams
from llamaherd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def float_model():
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    args = preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32)
    model = Transformer(args)
    model.init_rope()
    model.init_weights(std=0.5, seed=3)  # large weights: outputs that depend on the prompt
    with torch.no_grad():  # no special token (stop tokens among them) wins: rows of text to compare
        model.output.weight[256:] = 0
        model.output.weight[256:, 0] = -50
    return model.eval(), tok


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_engine_serves_a_quantised_model_as_generate_decodes_it(float_model, scheme):
    model, tok = float_model
    # float32 activations: the engine's paged attention and generate's static cache then agree exactly
    q = quantize(copy.deepcopy(model), scheme, 32 if scheme == "int4" else None, dtype=torch.float32)
    engine = Engine(q, tok, max_batch=4, kv_blocks=64, block_size=4)
    prompts = [tok.encode(p, bos=True) for p in ("def main():", "The quick brown fox", "import os\n")]
    requests = [engine.submit(p, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts]
    engine.start()
    try:
        for r in requests:
            assert r.done.wait(60)
        for prompt, r in zip(prompts, requests, strict=True):
            want = generate(q, [prompt], max_new_tokens=12, stop_tokens=tok.stop_tokens)[0]
            assert r.output == [t for t in want if t not in tok.stop_tokens] and r.output
        assert engine.pool.used_blocks == 0
    finally:
        engine.stop(drain=False)

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


def wait_until_ready(url: str, proc, timeout: float = 120) -> None:
    """Poll ``url``/health until the server (process ``proc``) has loaded its model: 200."""
    import time
    import urllib.error
    import urllib.request

    t0 = time.perf_counter()
    while True:
        try:
            if urllib.request.urlopen(url + "/health").status == 200:
                return
        except (urllib.error.URLError, ConnectionError):  # not listening yet, or 503 while loading
            pass
        assert time.perf_counter() - t0 < timeout and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.1)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_herd_serve_quant_serves_the_quantised_model_through_the_openai_client(float_model, tmp_path, scheme):
    """`herd serve CKPT --quant int8|int4` (a real server process, the official client) answers with the greedy
    text of the float checkpoint quantised in memory the same way: the quantisation happens as it loads."""
    import subprocess
    import sys

    import openai

    from llamaherd.checkpoint import save
    from llamaherd.serve.app import free_port

    model, tok = float_model
    save(model, tmp_path / "ckpt", layout="herd", tokenizer=tok)
    group = ["--group-size", "32"] if scheme == "int4" else []
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                             "--name", "tiny", "--quant", scheme, *group, "--dtype", "float32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, proc)
        q = quantize(copy.deepcopy(model), scheme, 32 if scheme == "int4" else None, dtype=torch.float32)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for prompt in ("def main():", "The quick brown fox"):
            ids = tok.encode(prompt, bos=True)
            want = [t for t in generate(q, [ids], max_new_tokens=12, stop_tokens=tok.stop_tokens)[0]
                    if t not in tok.stop_tokens]
            got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            assert got.choices[0].text == tok.decode(want) and want
        plain = [t for t in generate(model, [tok.encode("def main():", bos=True)], max_new_tokens=12)[0]]
        assert plain != generate(q, [tok.encode("def main():", bos=True)], max_new_tokens=12)[0]  # it is quantised
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_herd_serve_rejects_a_group_size_without_int4(float_model, tmp_path, capsys):
    from llamaherd.checkpoint import save
    from llamaherd.cli import main

    model, tok = float_model
    save(model, tmp_path / "ckpt", layout="herd", tokenizer=tok)
    assert main(["serve", str(tmp_path / "ckpt"), "--quant", "int8", "--group-size", "64"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--group-size 64 applies to --quant int4 only" in err

"""`herd serve`: a real server on loopback, driven by the official `openai` client and plain HTTP."""

import json
import threading
import urllib.error
import urllib.request

import openai
import pytest
import torch

from llamaherd.generation import generate
from llamaherd.model.args import preset
from llamaherd.model.transformer import Transformer
from llamaherd.serve.app import running_server
from llamaherd.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer():
    """A small random model with a byte-level tokenizer: its greedy outputs are varied enough to compare."""
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    args = preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, multiple_of=32)
    model = Transformer(args)
    model.init_rope()
    model.init_weights(std=0.5, seed=3)  # large weights: outputs that depend on the prompt
    return model.eval(), tok


@pytest.fixture(scope="module")
def server(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with running_server(model, tok, "tiny", kv_blocks=256, block_size=8, max_batch=16, api_key="sesame") as s:
        yield s


def client(server, key="sesame"):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)


def greedy(model, tok, prompt_ids, n):
    out = generate(model, [prompt_ids], max_new_tokens=n, temperature=0.0, stop_tokens=tok.stop_tokens)[0]
    return [t for t in out if t not in tok.stop_tokens]


PROMPTS = ["def main():", "The quick brown fox", "import os\n", "x = 1 + "]


def test_completions_equal_herd_generate(server, model_and_tokenizer):
    model, tok = model_and_tokenizer
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    for prompt in PROMPTS:
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        want = tok.decode(greedy(model, tok, tok.encode(prompt, bos=True), 12))
        assert r.choices[0].text == want, prompt
        assert r.usage.prompt_tokens == len(tok.encode(prompt, bos=True))
    # a list of prompts, and token ids
    r = c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1]
    ids = tok.encode(PROMPTS[0], bos=True)
    assert c.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0).choices[0].text == \
        r.choices[0].text


def test_chat_streaming_and_not_agree(server, model_and_tokenizer):
    model, tok = model_and_tokenizer
    from llamaherd.tokenizer.chat import ChatFormat

    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == whole.choices[0].message.content
    prompt = ChatFormat(tok).encode_dialog_prompt(messages)
    assert whole.choices[0].message.content == tok.decode(greedy(model, tok, prompt, 16))
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_logprobs_are_the_model_s(server, model_and_tokenizer):
    model, tok = model_and_tokenizer
    c = client(server)
    r = c.completions.create(model="tiny", prompt="abcd", max_tokens=3, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    ids = tok.encode("abcd", bos=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
    want = [None] + [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[: len(ids)][0] is None
    assert lp.token_logprobs[1: len(ids)] == pytest.approx(want[1:], abs=1e-4)
    assert len(lp.tokens) == len(ids) + 3 and all(len(t) == 3 for t in lp.top_logprobs[len(ids):])
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_stop_strings_are_never_sent(server, model_and_tokenizer):
    model, tok = model_and_tokenizer
    c = client(server)
    full = c.completions.create(model="tiny", prompt="def main():", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    assert stop and stop in full
    r = c.completions.create(model="tiny", prompt="def main():", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "def main():"}]
    full = c.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    text = full.choices[0].message.content
    if len(text) > 6:
        stop = text[3:6]
        parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=20, temperature=0, stop=stop, stream=True) if ch.choices]
        assert "".join(parts) == text[: text.index(stop)]


def test_concurrent_streams_equal_their_sequential_outputs_and_the_batch_grows(server, model_and_tokenizer):
    c = client(server)
    prompts = [f"{i} + {i * 7} = " for i in range(32)]
    sequential = [c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
                  for p in prompts]
    results = [None] * len(prompts)

    def one(i):
        stream = client(server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompts[i]}], max_tokens=10, temperature=0,
            stream=True)
        results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    chats = [c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], max_tokens=10,
                                       temperature=0).choices[0].message.content for p in prompts]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == chats  # every stream complete, in order, as when sent one at a time
    assert all(isinstance(s, str) for s in sequential)
    engine = server[2]
    assert max(engine.batch_sizes) > 1  # the batch really grew
    metrics = urllib.request.urlopen(server[0] + "/metrics").read().decode()
    assert "herd_batch_size_max" in metrics and "herd_kv_blocks_used 0.0" in metrics
    assert engine.pool.used_blocks == 0  # every block free again


def test_prompts_prefilled_together_left_padded_give_each_its_own_greedy_output(model_and_tokenizer):
    """Requests that arrive together are prefilled in one forward (padding in a scratch block); each output
    is still the one `herd generate` gives it alone, and every block is free afterwards."""
    from llamaherd.serve.engine import Engine, SamplingParams

    model, tok = model_and_tokenizer
    engine = Engine(model, tok, max_batch=8, kv_blocks=64, block_size=4)
    prompts = [tok.encode(p * k, bos=True) for k, p in enumerate(PROMPTS + ["a"], start=1)]  # 2 to 73 tokens
    requests = [engine.submit(p, SamplingParams(max_tokens=10, temperature=0.0)) for p in prompts]
    engine.start()  # all of them waiting: admitted in one turn
    try:
        for r in requests:
            assert r.done.wait(30)
        assert engine.prefill_sizes == {len(prompts): 1} and engine.pool.used_blocks == 0
        for prompt, r in zip(prompts, requests, strict=True):
            assert r.output == greedy(model, tok, prompt, 10) and r.output
    finally:
        engine.stop(drain=False)


def post(server, path, body, key="sesame", raw=None):
    req = urllib.request.Request(server[0] + path, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_auth_limits_and_bad_input_are_4xx_and_the_server_keeps_serving(server):
    assert post(server, "/v1/completions", {"prompt": "x"}, key=None)[0] == 401
    assert post(server, "/v1/completions", {"prompt": "x"}, key="wrong")[0] == 401
    cases = [
        ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "model": "gpt-9"}, 404, "does not exist"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": [1, 2, 10**9]}, 400, "token ids"),
        ({"prompt": "x" * 5000, "max_tokens": 1}, 400, "tokens"),
        ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ]
    for body, status, words in cases:
        code, answer = post(server, "/v1/completions", body)
        assert code == status and words in answer["error"]["message"], (body, answer)
    assert post(server, "/v1/chat/completions", {"messages": "hi"})[0] == 400
    assert post(server, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]})[0] == 400
    code, answer = post(server, "/v1/completions", None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in answer["error"]["message"]
    code, answer = post(server, "/v1/completions", {"prompt": "still here", "max_tokens": 2, "temperature": 0})
    assert code == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")
    assert post(server, "/tokenize", {"prompt": "ab"})[1]["tokens"][1:] == [97, 98]
    assert post(server, "/detokenize", {"tokens": [97, 98]})[1]["prompt"] == "ab"
    assert urllib.request.urlopen(server[0] + "/health").status == 200


def test_a_full_queue_is_429_with_retry_after(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with running_server(model, tok, "tiny", kv_blocks=8, block_size=8, max_batch=1, max_queue=0) as s:
        code, answer = post(s, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert code == 429 and "queue is full" in answer["error"]["message"]


def test_a_client_that_goes_away_frees_its_slot_at_once(model_and_tokenizer):
    import time

    model, tok = model_and_tokenizer
    # a context long enough that the request is still generating (seconds) when the client leaves
    with running_server(long_context(model), tok, "tiny", kv_blocks=1100, block_size=8) as (url, _, engine):
        stream = client((url, None, None), key="x").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=8000, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # the stream is under way
        stream.close()
        t0 = time.perf_counter()
        while (not engine.stats["finished_cancelled"] or engine.pool.used_blocks) and time.perf_counter() - t0 < 20:
            time.sleep(0.05)
        assert engine.stats["finished_cancelled"] == 1 and engine.pool.used_blocks == 0
        assert engine.stats["generation_tokens"] < 8000  # stopped early, not run to its end


def long_context(model):
    """``model`` with an 8K context: a request can generate for seconds."""
    long = Transformer(model.args.replace(max_seq_len=8192))
    long.load_state_dict(model.state_dict())
    long.init_rope()
    return long.eval()


def test_a_request_past_its_timeout_is_ended_with_408_and_frees_its_blocks(model_and_tokenizer):
    import time

    model, tok = model_and_tokenizer
    with running_server(long_context(model), tok, "tiny", kv_blocks=1100, block_size=8, timeout=0.5) as s:
        url, _, engine = s
        t0 = time.perf_counter()
        code, answer = post(s, "/v1/completions", {"prompt": "go on", "max_tokens": 8000, "temperature": 0,
                                                   "ignore_eos": True}, key=None)
        assert code == 408 and answer["error"]["type"] == "timeout_error" and "0.5 s" in answer["error"]["message"]
        assert time.perf_counter() - t0 < 5 and engine.stats["generation_tokens"] < 8000
        # streamed: the status is sent already, so the stream carries the error, then ends
        stream = client(s, key="x").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=8000, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError, match="longer than this server's limit"):
            for _ in stream:
                pass
        assert engine.stats["finished_timeout"] == 2 and engine.pool.used_blocks == 0
        code, answer = post(s, "/v1/completions", {"prompt": "ab", "max_tokens": 3, "ignore_eos": True}, key=None)
        assert code == 200 and answer["usage"]["completion_tokens"] == 3  # still serving


def test_herd_serve_compile_is_503_while_loading_then_greedy_equal_to_generate(model_and_tokenizer, tmp_path):
    """`herd serve --compile` listens at once and answers 503 while it loads and compiles; then its greedy
    outputs, several requests at once, are `herd generate`'s."""
    import subprocess
    import sys
    import time

    from llamaherd.checkpoint import save
    from llamaherd.serve.app import free_port

    model, tok = model_and_tokenizer
    save(model, tmp_path / "ckpt", layout="herd", tokenizer=tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                             "--name", "tiny", "--compile"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    statuses = []
    try:
        t0 = time.perf_counter()
        while not statuses or statuses[-1] != 200:
            try:
                statuses.append(urllib.request.urlopen(url + "/health").status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
                if e.code == 503 and len(statuses) == 1:  # the API says so too, in OpenAI's shape
                    code, answer = post((url, None, None), "/v1/completions", {"prompt": "x"}, key=None)
                    assert code == 503 and "loading" in answer["error"]["message"]
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.perf_counter() - t0 < 300 and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        assert statuses[0] == 503 and statuses[-1] == 200
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        answers = {}

        def ask(prompt):
            answers[prompt] = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)

        threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for prompt in PROMPTS:
            expected = tok.decode(greedy(model, tok, tok.encode(prompt, bos=True), 12))
            assert answers[prompt].choices[0].text == expected, prompt
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_herd_serve_serves_a_checkpoint_and_drains_on_sigterm(model_and_tokenizer, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from llamaherd.checkpoint import save
    from llamaherd.serve.app import free_port

    model, tok = model_and_tokenizer
    save(model, tmp_path / "ckpt", layout="herd", tokenizer=tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llamaherd", "serve", str(tmp_path / "ckpt"), "--port", str(port),
                             "--name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if urllib.request.urlopen(url + "/health").status == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.perf_counter() - t0 < 60 and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.1)
        result = {}

        def ask():
            result["answer"] = post((url, None, None), "/v1/completions",
                                    {"prompt": "def main():", "max_tokens": 480, "temperature": 0}, key=None)

        thread = threading.Thread(target=ask)
        thread.start()
        time.sleep(0.3)  # the request is running
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        code, answer = result["answer"]
        assert code == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")  # finished, not cut off
        # uvicorn finishes the open requests, then ends the process by the signal it was sent
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Finished server process" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_lm_evaluation_harness_scores_a_task_with_the_model_s_log_likelihoods(model_and_tokenizer, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok = model_and_tokenizer
    docs = [{"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
            {"question": "The capital of France is", "choices": ["Paris", "Rome"], "answer": 0},
            {"question": "def f(x): return", "choices": ["x", "None", "x + 1"], "answer": 2}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "herd_mc.yaml").write_text(
        "task: herd_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    with running_server(model, tok, "tiny", kv_blocks=256, block_size=8) as (url, _, _):
        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=["herd_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
            model_args=f"base_url={url}/v1/completions,model=tiny,tokenizer_backend=remote,num_concurrent=1,"
                       "max_retries=1", log_samples=True)
    samples = sorted(out["samples"]["herd_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs) and "acc,none" in out["results"]["herd_mc"]
    for doc, sample in zip(docs, samples, strict=True):
        context = tok.encode(doc["question"], allowed_special="all")
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):
            # the harness's request: the context, then " " + the choice (its target delimiter), encoded whole
            cont = tok.encode(doc["question"] + " " + choice, allowed_special="all")[len(context):]
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids)[0].float(), -1)
            want = sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont))
            assert resp[0][0] == pytest.approx(want, abs=1e-4), (doc["question"], choice)


@pytest.fixture(scope="module")
def fuzz_url(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with running_server(model, tok, "tiny", kv_blocks=128, block_size=8, max_total_tokens=48, max_batch=4,
                        max_queue=64) as (url, _, engine):
        yield url, engine


def test_a_schema_fuzz_run_finds_no_5xx_and_no_dead_engine(fuzz_url):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    url, engine = fuzz_url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    seen = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=schema.as_strategy())
    def check(case):
        response = case.call(timeout=60)
        seen.append((case.operation.label, response.status_code))
        assert response.status_code < 500, (case.operation.label, case.body, response.text)

    check()
    operations = {label for label, _ in seen}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize"} <= operations
    assert engine._thread.is_alive() and urllib.request.urlopen(url + "/health").status == 200


def _chromium():
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_the_chat_page_streams_a_reply_in_headless_chromium(server, model_and_tokenizer):
    """A real browser (Debian's chromium, driven by Playwright) types a message and sees the streamed reply."""
    from playwright import sync_api

    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's)")
    model, tok = model_and_tokenizer
    with running_server(model, tok, "tiny", kv_blocks=256, block_size=8) as (url, _, _):  # no API key: a page
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, headless=True,
                                        args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.goto(url + "/?temperature=0&max_tokens=24")  # greedy: the reply is known
                page.wait_for_function("document.getElementById('status').textContent.startsWith('model: tiny')")
                page.fill("#input", "Hello")
                page.press("#input", "Enter")
                page.wait_for_function("document.getElementById('status').textContent.includes('tokens/s')",
                                       timeout=60_000)
                texts = page.eval_on_selector_all(".msg", "nodes => nodes.map(n => n.textContent)")
                want = client((url, None, None), key="x").chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=24,
                    temperature=0).choices[0].message.content
                assert texts == ["Hello", want] and want  # the streamed reply, whole
                chunks = int(page.inner_text("#status").split()[0])
                assert chunks > 1  # it came in pieces, as a stream
            finally:
                browser.close()

"""generate(): greedy equals argmax of full forwards, batches of ragged prompts, sampling, stops, errors."""

import pytest
import torch

from llamaherd.errors import HerdError
from llamaherd.generation import clear_cache, generate, kept_cache, prepare_for_decoding, sample
from llamaherd.generation.compiled import _LIBRARIES, cache_length
from llamaherd.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=96)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ARGS)
    m.init_weights(seed=0, std=0.2)  # large weights: varied, non-repeating greedy output
    return m.eval()


def prompt(n, seed):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_by_full_forward(model, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-n:]


def test_greedy_matches_full_forward_argmax(model):
    p = prompt(13, 0)
    assert generate(model, [p], max_new_tokens=20) == [greedy_by_full_forward(model, p, 20)]


def test_batch_of_ragged_prompts_equals_one_by_one(model):
    prompts = [prompt(n, n) for n in (3, 17, 9, 30)]
    batched = generate(model, prompts, max_new_tokens=12)
    assert batched == [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    assert all(len(o) == 12 for o in batched)


def test_stop_tokens_end_each_row_separately(model):
    p = prompt(10, 5)
    free = generate(model, [p], max_new_tokens=15)[0]
    stop = free[4]
    first = free.index(stop)
    out = generate(model, [p, prompt(6, 6)], max_new_tokens=15, stop_tokens=[stop])
    assert out[0] == free[: first + 1]  # the stop token is included, nothing after it
    assert len(out[1]) <= 15


def test_streaming_callback_sees_every_new_token_in_order(model):
    seen = {0: [], 1: []}
    out = generate(model, [prompt(4, 1), prompt(11, 2)], max_new_tokens=9,
                   on_token=lambda row, tok: seen[row].append(tok))
    assert [seen[0], seen[1]] == out


def test_on_token_returning_true_ends_that_row_there(model):
    """A caller that stops on text (evaluation's stop strings) ends a row from the callback: the row keeps
    what came up to that token, the other rows go on as before."""
    prompts = [prompt(4, 1), prompt(11, 2)]
    free = generate(model, prompts, max_new_tokens=12)
    seen = {0: [], 1: []}

    def on_token(row, tok):
        seen[row].append(tok)
        return row == 0 and len(seen[0]) == 5

    out = generate(model, prompts, max_new_tokens=12, on_token=on_token)
    assert out == [free[0][:5], free[1]] and seen[0] == free[0][:5]


def test_sampling_is_seeded_and_respects_top_k(model):
    p = prompt(8, 3)
    a = generate(model, [p], max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    b = generate(model, [p], max_new_tokens=20, temperature=1.0, top_p=0.95, seed=7)
    c = generate(model, [p], max_new_tokens=20, temperature=1.0, top_p=0.95, seed=8)
    assert a == b and a != c
    assert generate(model, [p], max_new_tokens=10, temperature=5.0, top_k=1, seed=1) == \
        generate(model, [p], max_new_tokens=10)  # top-1 sampling is greedy


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, 1.0, top_k=2, generator=gen)) for _ in range(200)}
    assert draws == {2, 3}
    peaked = torch.tensor([[0.0, 0.0, 10.0, 0.0]])
    assert {int(sample(peaked, 1.0, top_p=0.5, generator=gen)) for _ in range(50)} == {2}
    assert int(sample(logits, 0.0)) == 3


def test_context_overflow_and_bad_prompts_are_clear_errors(model):
    with pytest.raises(HerdError, match="does not fit the context of 96"):
        generate(model, [prompt(96, 0)], max_new_tokens=4)
    with pytest.raises(HerdError, match="at least one token"):
        generate(model, [[]], max_new_tokens=4)
    with pytest.raises(HerdError, match=r"\[0, 300\)"):
        generate(model, [[5, 300]], max_new_tokens=4)
    # generation stops at the context limit instead of overflowing it
    out = generate(model, [prompt(90, 0)], max_new_tokens=50)
    assert len(out[0]) == 6


def test_cpu_decoding_reads_weights_column_major_with_the_same_values_and_tokens(tmp_path):
    import llamaherd

    torch.manual_seed(0)
    m = Transformer(ModelArgs(**{**ARGS.__dict__, "tie_embeddings": True})).eval()
    m.init_weights(seed=1, std=0.2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = prompt(9, 3)
    expected = greedy_by_full_forward(m, p, 16)  # row-major weights

    assert prepare_for_decoding(m) is m
    assert generate(m, [p], max_new_tokens=16) == [expected]
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    linears = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    wide = [w for w in linears if w.shape[0] >= w.shape[1]]  # wq, wo, w1, w3, the (tied) output head
    assert wide and all(w.stride() == (1, w.shape[0]) for w in wide)  # [out, in] stored as [in, out]
    assert all(w.is_contiguous() for w in linears if w.shape[0] < w.shape[1])  # wk, wv, w2 stay row-major
    ptrs = [w.data_ptr() for w in linears]
    assert generate(m, [p], max_new_tokens=16) == [expected] and [w.data_ptr() for w in linears] == ptrs

    half = Transformer(ARGS).to(torch.bfloat16).eval()
    generate(prepare_for_decoding(half), [p], max_new_tokens=2)
    assert all(p.is_contiguous() for p in half.parameters())  # bfloat16 products are slower column-major
    converted = Transformer(ARGS).eval()
    generate(prepare_for_decoding(converted), [p], max_new_tokens=2)
    # a float32 model made bfloat16 after decoding
    generate(prepare_for_decoding(converted.to(torch.bfloat16)), [p], max_new_tokens=2)
    assert all(p.is_contiguous() for p in converted.parameters())

    # training and saving work unchanged on the new layout
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    tokens = torch.tensor([p])
    loss = torch.nn.functional.cross_entropy(m(tokens)[0, :-1], tokens[0, 1:])
    loss.backward()
    opt.step()
    llamaherd.save(m, tmp_path / "ckpt")
    loaded, _ = llamaherd.load(tmp_path / "ckpt")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in m.state_dict().items())


def test_generate_leaves_the_model_as_it_was():
    """generate() changes no weight, layout or attribute of the caller's model; the decode cache is its own."""
    torch.manual_seed(0)
    m = Transformer(ARGS).eval()
    before = {name: (t.data_ptr(), t.stride(), t.clone()) for name, t in m.state_dict().items()}
    generate(m, [prompt(5, 1), prompt(9, 2)], max_new_tokens=6)
    after = m.state_dict()
    assert before.keys() == after.keys()
    for name, (ptr, stride, value) in before.items():
        assert (after[name].data_ptr(), after[name].stride()) == (ptr, stride) and torch.equal(after[name], value)
    assert {name for name, _ in m.named_buffers()} == {"rope_cos", "rope_sin"}  # no cache left attached


def test_compiled_decoding_gives_the_same_tokens(model):
    """generate(compile=True) (inductor here; CUDA graphs on a GPU) against the eager decode loop."""
    prompts = [prompt(3, 7), prompt(8, 8)]
    assert generate(model, prompts, max_new_tokens=10, compile=True) == generate(model, prompts, max_new_tokens=10)


def test_decoding_ends_soon_after_every_row_stops(model):
    """The end is checked every few steps unless tokens are streamed; extra steps emit nothing."""
    p = prompt(10, 5)
    free = generate(model, [p], max_new_tokens=40)[0]
    stop = free[3]
    first = free.index(stop)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert generate(model, [p], max_new_tokens=40, stop_tokens=[stop]) == [free[: first + 1]]
        assert first + 1 <= len(calls) <= first + 1 + 8  # prefill + one step per token, + at most 8 unchecked
        calls.clear()
        generate(model, [p], max_new_tokens=40, stop_tokens=[stop], on_token=lambda *_: None)
        assert len(calls) == first + 1  # streaming: checked at every step
    finally:
        hook.remove()


def test_compiled_decoding_keeps_its_cache_and_step_between_calls(model):
    """The cache, rounded up to a power of two (here capped at the context of 96), stays allocated,
    zeroed and reused by a call of another length, so the compiled step (here an ahead-of-time
    compiled library, on a GPU a captured CUDA graph) is built once."""
    p = prompt(5, 9)
    first = generate(model, [p], max_new_tokens=7, compile=True)
    cache = kept_cache(model)
    assert cache is not None and cache.layers[0].k.shape[2] == 96
    built = dict(_LIBRARIES[model])
    again = generate(model, [p[:3]], max_new_tokens=20, compile=True)
    assert kept_cache(model) is cache and _LIBRARIES[model] == built
    assert first == generate(model, [p], max_new_tokens=7)
    assert again == generate(model, [p[:3]], max_new_tokens=20)
    clear_cache(model)


def test_compiled_cpu_step_reads_the_models_current_weights(model):
    """The compiled CPU step holds pointers to the model's tensors, not copies: weights changed in
    place or replaced by new tensors of the same shape and layout are used without a rebuild."""
    p = prompt(6, 10)
    before = generate(model, [p], max_new_tokens=12, compile=True)
    built = dict(_LIBRARIES[model])
    w2, wo = model.layers[0].feed_forward.w2, model.layers[1].attention.wo
    old_wo = wo.weight
    try:
        with torch.no_grad():
            w2.weight.mul_(-1)
        wo.weight = torch.nn.Parameter(torch.randn_like(old_wo) * 0.2)
        changed = generate(model, [p], max_new_tokens=12)
        assert changed != before
        assert generate(model, [p], max_new_tokens=12, compile=True) == changed
        assert _LIBRARIES[model] == built
    finally:
        with torch.no_grad():
            w2.weight.mul_(-1)
        wo.weight = old_wo
        clear_cache(model)


def test_a_failed_cpu_compile_is_a_one_line_error(monkeypatch):
    import torch._inductor

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    m = Transformer(ARGS).eval()
    with pytest.raises(HerdError, match=r"compiling the CPU decode step failed \(RuntimeError: no C\+\+ compiler "
                                        r"found\); decode without compile$"):
        generate(m, [prompt(4, 1)], max_new_tokens=3, compile=True)
    assert generate(m, [prompt(4, 1)], max_new_tokens=3) == [greedy_by_full_forward(m, prompt(4, 1), 3)]


def test_cache_length_for_compiled_decoding_is_a_power_of_two():
    lengths = [cache_length(n, 8192, compiled=True) for n in (1, 100, 256, 257, 272, 5000)]
    assert lengths == [256, 256, 256, 512, 512, 8192]
    assert cache_length(5000, 4096, compiled=True) == 4096 and cache_length(100, 200, compiled=True) == 200
    assert cache_length(272, 8192, compiled=False) == 272

"""The model on its own: shapes, presets, document masking, KV-cache decoding, meta-device build."""

import time

import pytest
import torch

from llamaherd.errors import HerdError
from llamaherd.generation import StaticKVCache, grouped_decode_attention
from llamaherd.model import ModelArgs, Transformer, flops_per_token, num_params, preset
from llamaherd.model.masks import causal_mask, dense_doc_mask, doc_mask, doc_positions

SMALL = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=257, multiple_of=32, max_seq_len=128)


def packed(model, tokens, doc_ids, mask=None):
    """The forward pass of packed rows: positions restart and attention stays inside each document."""
    return model(tokens, doc_positions(doc_ids), mask=doc_mask(doc_ids) if mask is None else mask)


def make_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**SMALL, **overrides}))
    model.init_weights(seed=seed)
    return model.eval()


@pytest.mark.parametrize(
    "name, params, hidden",
    [
        ("llama3-8b", 8_030_261_248, 14336),
        ("llama3.1-70b", 70_553_706_496, 28672),
        ("llama3.1-405b", 405_853_388_800, 53248),
        ("llama3.2-1b", 1_235_814_400, 8192),
        ("llama3.2-3b", 3_212_749_824, 8192),
    ],
)
def test_presets_match_published_shapes(name, params, hidden):
    args = preset(name)
    assert args.hidden_dim == hidden
    assert num_params(args) == params
    assert args.n_kv_heads == 8 and args.rope_theta == 500_000 and args.norm_eps == 1e-5


def test_preset_rope_scaling_and_tying():
    assert not preset("llama3-8b").use_scaled_rope and preset("llama3-8b").max_seq_len == 8192
    assert preset("llama3.1-8b").use_scaled_rope and preset("llama3.1-8b").rope_scaling_factor == 8
    for name in ("llama3.2-1b", "llama3.2-3b"):
        assert preset(name).tie_embeddings and preset(name).rope_scaling_factor == 32


def test_param_count_matches_module():
    for tie in (True, False):
        model = make_model(tie_embeddings=tie)
        counted = sum(p.numel() for p in model.parameters())  # shared weights are yielded once
        assert num_params(model.args) == counted


def test_flops_per_token_formula():
    args = preset("llama3-8b")
    n = num_params(args, embeddings=False) - (2 * args.n_layers + 1) * args.dim + args.vocab_size * args.dim
    assert flops_per_token(args, 8192) == 6 * n + 12 * 32 * 4096 * 8192
    assert flops_per_token(args, 8192, causal_half=True) == 6 * n + 6 * 32 * 4096 * 8192


def test_bad_args_are_one_line_errors():
    with pytest.raises(HerdError, match="divisible"):
        ModelArgs(dim=100, n_heads=8)
    with pytest.raises(HerdError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(HerdError, match="unknown"):
        preset("llama9-1t")
    with pytest.raises(HerdError, match="unknown field"):
        ModelArgs.from_dict({"dim": 64, "n_heads": 8, "bogus": 1})


def test_forward_shape_and_context_limit():
    model = make_model()
    logits = model(torch.randint(0, 257, (3, 17)))
    assert logits.shape == (3, 17, 257)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_doc_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3, 3]])
    assert doc_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 0, 1, 2, 3, 4, 0, 0, 1]]


def test_dense_doc_mask_never_crosses_documents():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = dense_doc_mask(doc_ids)[0, 0]
    for q in range(6):
        for k in range(6):
            assert bool(mask[q, k]) == (k <= q and int(doc_ids[0, q]) == int(doc_ids[0, k]))


@pytest.mark.parametrize("tie", [True, False])
def test_packed_row_of_three_documents_equals_each_document_alone(tie):
    """Must show 3: a packed row of 3 documents gives each document the logits it has alone."""
    model = make_model(tie_embeddings=tie, use_scaled_rope=True, rope_original_context=16)
    lengths = [11, 30, 23]
    docs = [torch.randint(0, 257, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    row = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = packed(model, row, doc_ids)
        start = 0
        for doc, n in zip(docs, lengths):
            alone = model(doc)
            torch.testing.assert_close(together[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        # and without the mask the later documents do see the earlier ones (so the check has teeth)
        unmasked = model(row)
        assert not torch.allclose(unmasked[:, lengths[0]:], together[:, lengths[0]:], atol=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_mask_matches_dense_mask():
    """The FlexAttention path used on CUDA computes the same block-causal attention as the dense one."""
    from torch.nn.attention.flex_attention import flex_attention

    from llamaherd.model.masks import flex_doc_mask

    torch.manual_seed(0)
    doc_ids = torch.tensor([[0] * 40 + [1] * 50 + [2] * 38, [0] * 128])
    q, k, v = (torch.randn(2, 4, 128, 16) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=flex_doc_mask(doc_ids))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_doc_mask(doc_ids))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # and through the whole model, GQA included
    model = make_model()
    tokens = torch.randint(0, 257, (2, 128), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = packed(model, tokens, doc_ids, mask=doc_mask(doc_ids, flex=False))
        flexed = packed(model, tokens, doc_ids, mask=doc_mask(doc_ids, flex=True))
    torch.testing.assert_close(flexed, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 8])
def test_kv_cache_decoding_matches_full_forward_at_every_step(n_kv_heads):
    """Must show 4: prefill + one-token steps with the KV cache give the full-forward logits."""
    model = make_model(n_kv_heads=n_kv_heads, use_scaled_rope=True, rope_original_context=16)
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        # masks as wide as the filled part of the cache; for the one-token steps, the width alone (what
        # generate() passes); and none (the whole cache masked by position: the static-shape path under compile)
        for form in ("causal", "width", "none"):
            cache = StaticKVCache(model.args, 2, 64)
            prefill = 9
            got = []
            for pos in [torch.arange(prefill)] + [torch.tensor([p]) for p in range(prefill, 40)]:
                filled = int(pos[-1]) + 1
                mask = {"causal": causal_mask(pos, filled), "none": None,
                        "width": torch.ones(filled, dtype=torch.bool) if len(pos) == 1 else causal_mask(pos, filled)}
                got.append(model(tokens[:, pos], pos, mask=mask[form], cache=cache))
            torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 8])
def test_grouped_decode_attention_equals_sdpa_with_gqa(n_kv_heads):
    g = torch.Generator().manual_seed(n_kv_heads)
    q = torch.randn(2, 8, 1, 16, generator=g)
    k, v = (torch.randn(2, n_kv_heads, 13, 16, generator=g) for _ in range(2))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(grouped_decode_attention(q, k, v), want, rtol=1e-5, atol=1e-6)
    mask = torch.rand(2, 1, 1, 13, generator=g) < 0.6
    mask[..., 0] = True  # every row sees something
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_decode_attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)


def test_kv_cache_does_not_repeat_kv_heads():
    model = make_model(n_kv_heads=2)
    cache = StaticKVCache(model.args, 3, 32).layers[0]
    assert cache.k.shape == (3, 2, 32, 8) and cache.v.shape == (3, 2, 32, 8)


def test_large_presets_build_on_meta_device_quickly():
    with torch.device("meta"):
        Transformer(ModelArgs(**SMALL))  # first use of the meta device pays one-off dispatch set-up
        for name in ("llama3.1-405b", "llama3.1-70b", "llama3-8b"):
            start = time.perf_counter()
            model = Transformer(preset(name))
            elapsed = time.perf_counter() - start
            assert elapsed < 2.0, f"{name} took {elapsed:.2f}s on the meta device"
            assert all(p.is_meta for p in model.parameters())
            assert num_params(model.args) == sum(p.numel() for p in model.parameters())


def test_init_weights_is_seeded_and_tied_weights_stay_shared():
    a, b = make_model(seed=3), make_model(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    tied = make_model(tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight


def decode_ragged(model, seqs, lengths, steps, per_row=True):
    """Prefill right-padded prompts of ``lengths`` in one batch and cache, then feed each row its next
    ``steps`` tokens: each row at its own positions (``per_row``), or all at the longest row's position.
    Returns [B, steps + 1, vocab]: each row's logits after its prompt and after every fed token."""
    batch, longest = len(lengths), max(lengths)
    n = torch.tensor(lengths)
    cache = StaticKVCache(model.args, batch, 32)
    prompts = torch.zeros(batch, longest, dtype=torch.long)
    for i, seq in enumerate(seqs):
        prompts[i, : lengths[i]] = seq[: lengths[i]]
    pos = torch.arange(longest).expand(batch, longest)
    logits = model(prompts, pos, mask=causal_mask(pos, longest), cache=cache)
    out = [logits[torch.arange(batch), n - 1 if per_row else longest - 1]]
    for t in range(steps):
        pos = (n + t)[:, None] if per_row else torch.full((batch, 1), longest + t)
        tokens = torch.stack([seq[k + t] for seq, k in zip(seqs, lengths)])[:, None]
        out.append(model(tokens, pos, mask=causal_mask(pos, int(pos.max()) + 1), cache=cache)[:, -1])
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("n_kv_heads", [2, 8])
def test_ragged_batch_with_per_row_positions_gives_each_row_its_logits_alone(n_kv_heads):
    """Rows of different lengths share one batch and one cache, each at its own positions: at every
    step each row gets the logits it gets decoded alone (what a serving engine's batching rests on)."""
    model = make_model(n_kv_heads=n_kv_heads, use_scaled_rope=True, rope_original_context=16)
    lengths, steps = [5, 12, 8], 6
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 257, (n + steps,), generator=gen) for n in lengths]  # prompt + tokens fed later
    with torch.no_grad():
        together = decode_ragged(model, seqs, lengths, steps)
        for i, (seq, n) in enumerate(zip(seqs, lengths)):
            alone = decode_ragged(model, [seq], [n], steps)[0]
            torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(alone, model(seq[None])[0, n - 1:], rtol=1e-5, atol=1e-5)  # = no cache
        # one shared position for every row (the padding then sits inside the shorter rows) does not do it
        shared = decode_ragged(model, seqs, lengths, steps, per_row=False)
        assert not torch.allclose(shared[0, 1:], together[0, 1:], atol=1e-3)
        torch.testing.assert_close(shared[1], together[1], rtol=1e-5, atol=1e-5)  # the longest row is unaffected

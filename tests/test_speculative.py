"""Speculative decoding (generate(..., draft_model=...)): greedy output identical to plain greedy decoding of the
target, whatever the draft; sampled output distributed as the target's; stops, limits, on_token; bad drafts."""

import pytest
import torch

from llamaherd.errors import HerdError
from llamaherd.generation import generate
from llamaherd.generation.speculative import distribution
from llamaherd.model import ModelArgs, Transformer

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=96)


def build(args, seed, std=0.2):
    torch.manual_seed(seed)
    m = Transformer(args)
    m.init_weights(seed=seed, std=std)  # large weights: varied, non-repeating greedy output
    return m.eval()


@pytest.fixture(scope="module")
def target():
    return build(ARGS, 0)


@pytest.fixture(scope="module")
def draft():
    """An unrelated, smaller model of the same vocabulary: it rarely agrees with the target."""
    return build(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, multiple_of=32,
                           max_seq_len=96), 1)


def prompt(n, seed):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("k", [1, 3, 4, 8])
def test_greedy_output_is_the_target_s_own_with_a_draft_that_disagrees(target, draft, k):
    prompts = [prompt(n, n) for n in (1, 5, 17)]
    plain = generate(target, prompts, max_new_tokens=30)
    stats = {}
    assert generate(target, prompts, max_new_tokens=30, draft_model=draft, draft_tokens=k, stats=stats) == plain
    assert stats["proposed"] > 0 and 0 <= stats["accepted"] < stats["proposed"]
    assert stats["acceptance"] < 0.5  # an unrelated draft: most proposals are refused, the output is unchanged


def test_the_target_as_its_own_draft_accepts_every_token_in_few_rounds(target):
    p = prompt(9, 3)
    stats = {}
    out = generate(target, [p], max_new_tokens=40, draft_model=target, draft_tokens=4, stats=stats)
    assert out == generate(target, [p], max_new_tokens=40)
    assert stats["acceptance"] == 1.0 and stats["rounds"] == 8  # 5 tokens a round: 4 drafted + the bonus


def test_stops_limits_and_on_token_end_rows_as_plain_decoding_does(target, draft):
    prompts = [prompt(n, 10 + n) for n in (4, 11)]
    plain = generate(target, prompts, max_new_tokens=25)
    stop = plain[0][6]  # a token the first row produces: it must end there, stop token included
    want = generate(target, prompts, max_new_tokens=25, stop_tokens=[stop])
    assert generate(target, prompts, max_new_tokens=25, stop_tokens=[stop], draft_model=draft) == want
    assert want[0][-1] == stop and len(want[0]) <= 7
    seen = []

    def on_token(row, tok):
        seen.append((row, tok))
        return row == 1 and len([s for s in seen if s[0] == 1]) == 5  # row 1 ends after 5 tokens

    out = generate(target, prompts, max_new_tokens=25, draft_model=draft, on_token=on_token)
    assert out[1] == plain[1][:5] and out[0] == plain[0]
    assert [t for r, t in seen if r == 0] == plain[0] and [t for r, t in seen if r == 1] == plain[1][:5]
    # near the context limit: the row fills the context and stops there, as plain decoding does
    long = prompt(90, 7)
    assert generate(target, [long], max_new_tokens=20, draft_model=draft, draft_tokens=8) == \
        generate(target, [long], max_new_tokens=20)


def test_sampling_keeps_the_target_s_distribution():
    """The first sampled token over many seeds follows the target's softmax, with a draft that disagrees."""
    small = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8, multiple_of=32, max_seq_len=16)
    target, draft = build(small, 0, std=0.5), build(small, 5, std=0.5)
    p = [1, 2, 3]
    with torch.no_grad():
        want = distribution(target(torch.tensor([p]))[0, -1], 1.0, 1.0, None)
        q = distribution(draft(torch.tensor([p]))[0, -1], 1.0, 1.0, None)
    assert (want - q).abs().sum() > 0.3  # the draft's proposals are far from the target's
    n = 3000
    counts, accepted = torch.zeros(8), 0
    for seed in range(n):
        stats = {}
        tok = generate(target, [p], max_new_tokens=2, temperature=1.0, seed=seed, draft_model=draft,
                       draft_tokens=1, stats=stats)[0][0]
        counts[tok] += 1
        accepted += stats["accepted"]
    # total variation between the empirical and the target's distribution: ~0.03 expected from 3,000 draws
    assert 0.5 * (counts / n - want).abs().sum() < 0.05
    assert 0.2 * n < accepted < 0.9 * n  # the draft's token was kept in some rounds, refused in others


def test_bad_drafts_are_one_line_errors(target):
    other = build(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256, multiple_of=32,
                            max_seq_len=96), 2)
    with pytest.raises(HerdError, match="draft model: vocabulary of 256 tokens, the target's has 300"):
        generate(target, [[1, 2]], max_new_tokens=4, draft_model=other)
    with pytest.raises(HerdError, match="draft_tokens 0"):
        generate(target, [[1, 2]], max_new_tokens=4, draft_model=target, draft_tokens=0)
    with pytest.raises(HerdError, match="compile with a draft model"):
        generate(target, [[1, 2]], max_new_tokens=4, draft_model=target, compile=True)


def test_herd_generate_with_a_draft_prints_the_target_s_greedy_text(tmp_path, capsys, make_tiny_model,
                                                                    small_tokenizer):
    from llamaherd.checkpoint import save
    from llamaherd.cli import main

    target = make_tiny_model(seed=1, max_seq_len=512)
    small = make_tiny_model(seed=2, max_seq_len=512, n_layers=1)
    save(target, tmp_path / "target", layout="herd", tokenizer=small_tokenizer)
    save(small, tmp_path / "draft", layout="herd", tokenizer=small_tokenizer)
    argv = ["generate", str(tmp_path / "target"), "--prompt", "the cat", "--temperature", "0", "--max-new-tokens",
            "16", "--device", "cpu"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--draft", str(tmp_path / "draft"), "--draft-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert out == plain and "proposed tokens accepted" in err
    assert main([*argv, "--draft", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err

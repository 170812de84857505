"""Speculative decoding (generate(..., draft_model=...)): greedy output identical to plain greedy decoding of the
target, whatever the draft; sampled output distributed as the target's; stops, limits, on_token; bad drafts."""

import re

import pytest
import torch

from llamaherd.errors import HerdError
from llamaherd.generation import generate
from llamaherd.generation.speculative import distribution
from llamaherd.model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits for a core

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


def test_a_draft_with_a_shorter_context_stops_proposing_and_the_target_goes_on(target):
    short = build(ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=300, multiple_of=32,
                            max_seq_len=24), 4)
    fits, too_long = prompt(10, 20), prompt(30, 21)  # the second does not even fit the draft's context
    stats = {}
    out = generate(target, [fits, too_long], max_new_tokens=40, draft_model=short, draft_tokens=4, stats=stats)
    assert out == generate(target, [fits, too_long], max_new_tokens=40) and [len(o) for o in out] == [40, 40]
    # row 0's draft proposes while its 24 positions hold the row, at most 15 rounds of 4; row 1's never does
    assert 0 < stats["proposed"] <= 15 * 4 and stats["rounds"] > 40 - 15
    stats = {}
    assert generate(target, [too_long], max_new_tokens=5, draft_model=short, stats=stats) == [out[1][:5]]
    assert stats["proposed"] == 0 and stats["rounds"] == 5 and stats["acceptance"] is None


def chi_square_limit(df: int, z: float = 3.09) -> float:
    """The chi-square statistic that ``df`` degrees of freedom exceed with probability 0.001 (z = 3.09), by the
    Wilson-Hilferty approximation (within 1% for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def chi_square(tokens: list[int], want: torch.Tensor) -> tuple[float, float]:
    """(Pearson's statistic of ``tokens`` against the distribution ``want``, its 0.1% limit); a token outside
    ``want``'s support fails at once."""
    counts = torch.bincount(torch.tensor(tokens), minlength=want.numel()).double()
    support = want > 0
    assert counts[~support].sum() == 0, "a token that top-k / top-p remove from the target's distribution"
    expected = len(tokens) * want[support].double().clamp(min=1e-9)
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat, chi_square_limit(int(support.sum()) - 1)


SMALL = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, multiple_of=32, max_seq_len=16)


def filtered(model, tokens, temperature, top_k, top_p):
    """The distribution ``sample`` draws the next token of ``tokens`` from."""
    with torch.no_grad():
        return distribution(model(torch.tensor([tokens]))[0, -1], temperature, top_p, top_k)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, 1.0), (0.7, 6, 0.9)])
def test_sampling_keeps_the_target_s_distribution(temperature, top_k, top_p):
    """The first sampled token of 2,000 rows follows the target's (filtered) softmax, with a draft that often
    disagrees: each row is an independent draw (one seeded generator, rows decoded one after another)."""
    target, draft = build(SMALL, 0, std=0.5), build(SMALL, 5, std=0.5)
    p, n = [1, 2, 3], 2000
    want, q = filtered(target, p, temperature, top_k, top_p), filtered(draft, p, temperature, top_k, top_p)
    assert 0.5 * (want - q).abs().sum() > 0.25  # the draft proposes far from the target's distribution
    stats = {}
    # max_new_tokens=2 and one draft token: the first new token is the draft's, kept or replaced
    out = generate(target, [p] * n, max_new_tokens=2, temperature=temperature, top_k=top_k, top_p=top_p, seed=0,
                   draft_model=draft, draft_tokens=1, stats=stats)
    first = [row[0] for row in out]
    stat, limit = chi_square(first, want)
    assert stat < limit, (stat, limit)  # the target's distribution, at the 0.1% level
    # the same statistic rejects the draft's distribution, which a broken rejection rule would give
    counts, from_draft = torch.bincount(torch.tensor(first), minlength=16), n * q.double().clamp(min=1e-9)
    assert float(((counts - from_draft) ** 2 / from_draft).sum()) > 10 * limit
    # a proposal is kept with probability sum_x min(p(x), q(x)): here both branches ran, keeping and replacing
    assert stats["proposed"] == n and abs(stats["acceptance"] - float(torch.minimum(want, q).sum())) < 0.04
    assert 0.1 < stats["acceptance"] < 0.9


def test_sampling_with_the_target_as_its_own_draft_keeps_every_proposal_and_samples_the_bonus_token():
    target, p, n = build(SMALL, 0, std=0.5), [1, 2, 3], 2000
    stats = {}
    out = generate(target, [p] * n, max_new_tokens=2, temperature=0.8, seed=1, draft_model=target, draft_tokens=1,
                   stats=stats)
    assert stats["acceptance"] == 1.0 and stats["rounds"] == n  # p / q = 1: every proposal kept, one round a row
    stat, limit = chi_square([row[0] for row in out], filtered(target, p, 0.8, None, 1.0))
    assert stat < limit, (stat, limit)
    # the second token is the bonus, sampled from the target's distribution after the first
    x = max(set(r[0] for r in out), key=[r[0] for r in out].count)
    stat, limit = chi_square([r[1] for r in out if r[0] == x], filtered(target, [*p, x], 0.8, None, 1.0))
    assert stat < limit, (stat, limit)


def test_sampling_with_a_draft_is_seeded_and_accepts_everything_from_the_target_itself(target):
    stats = {}
    rows = [prompt(5, 30), prompt(12, 31)]
    out = generate(target, rows, max_new_tokens=21, temperature=0.9, top_p=0.95, seed=7, draft_model=target,
                   draft_tokens=4, stats=stats)
    # every proposal kept; 21 tokens a row = 4 rounds of 4 + 1, then 1 round of the target alone
    assert stats["acceptance"] == 1.0 and stats["proposed"] == 2 * 16 and stats["rounds"] == 2 * 5
    assert [len(o) for o in out] == [21, 21]
    again = generate(target, rows, max_new_tokens=21, temperature=0.9, top_p=0.95, seed=7, draft_model=target)
    other = generate(target, rows, max_new_tokens=21, temperature=0.9, top_p=0.95, seed=8, draft_model=target)
    assert again == out and other != out


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
    assert out == plain and re.search(r"draft: \d+ of \d+ proposed tokens accepted \(\d+%\) in \d+ rounds", err)
    assert main([*argv, "--draft", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err
    save(make_tiny_model(seed=3, vocab_size=512), tmp_path / "other", layout="herd")
    assert main([*argv, "--draft", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "error: draft model: vocabulary of 512 tokens" in err and "Traceback" not in err

"""Speculative decoding: a small draft model proposes tokens, the target model checks them all in one forward.

Each round, for one row holding n tokens:

1. the draft proposes k tokens d_1..d_k, one at a time over its own KV cache (cheap: it is small);
2. the target runs once over [x_{n-1}, d_1, .., d_k] (k + 1 positions over its KV cache), which gives its
   distribution p_i for positions n .. n + k;
3. greedy: d_i is kept while it is the target's argmax, and the round adds the kept tokens and then the
   target's own token where they part (or after all k): the tokens plain greedy decoding of the target gives.
   Sampling: d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)) (q_i the draft's distribution); the
   first refused one is replaced by a sample of norm(max(0, p_i - q_i)); after k kept tokens a bonus token is
   sampled from p_{k+1}. The output is then distributed exactly as the target's own samples (Leviathan et al.
   2023, Chen et al. 2023), with temperature, top-k and top-p applied to both p and q as ``sample`` applies them.

So a round costs k draft steps and one target forward over k + 1 tokens and adds 1 to k + 1 tokens; on a GPU,
where a forward over a few tokens costs what a forward over one does (decoding is bound by reading the
weights), the speed-up is about the tokens a round adds. A KV cache is overwritten by position, so undoing
refused tokens is only a matter of where the next round writes: slots past a row's length are never attended
to (the mask is causal by position). A draft whose context is shorter than the target's stops proposing where
its context ends, and the target goes on alone.

Rows of a batch are decoded one after another, each with caches of its own: each row keeps every token its
draft got right (a batched round would keep only the fewest any row got right, and need per-row positions and
masks), and a row is the case speculative decoding serves, one latency-bound stream. A batch large enough to
keep the device busy gains little from drafting anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from llamaherd.errors import HerdError
from llamaherd.generation.cache import StaticKVCache
from llamaherd.model.masks import causal_mask


def distribution(logits: torch.Tensor, temperature: float, top_p: float, top_k: int | None,
                 normalize: bool = True) -> torch.Tensor:
    """The probabilities ``sample`` draws from at ``temperature`` > 0: logits [..., vocab] scaled, then the
    top-k and the top-p nucleus kept (renormalised unless ``normalize`` is false: ``multinomial`` does not
    need it, the acceptance test does)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        cumulative = sorted_probs.cumsum(dim=-1)
        sorted_probs = sorted_probs.masked_fill(cumulative - sorted_probs > top_p, 0.0)  # keep the nucleus
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        if normalize:
            probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class _Cached:
    """One model with a one-row KV cache and how many positions of it hold the row's tokens."""

    def __init__(self, model, length: int):
        w = model.tok_embeddings.weight
        self.model, self.done, self.length = model, 0, length
        self.cache = StaticKVCache(model.args, 1, length, w.dtype, w.device)

    def feed(self, tokens: list[int], last_only: bool = False) -> torch.Tensor:
        """Run ``tokens`` at the next positions; their logits [len(tokens), vocab] (or [1, vocab], the last)."""
        device = self.model.tok_embeddings.weight.device
        positions = torch.arange(self.done, self.done + len(tokens), device=device)
        x = torch.tensor([tokens], dtype=torch.long, device=device)
        # the mask spans exactly the positions written so far: stale slots of refused tokens lie past it
        logits = self.model(x, positions, mask=causal_mask(positions, self.done + len(tokens)), cache=self.cache,
                            last_only=last_only)
        self.done += len(tokens)
        return logits[0]


def check_draft(model, draft) -> None:
    """A draft's tokens are the target's token ids: the two must share the vocabulary, and sit on one device."""
    if draft.args.vocab_size != model.args.vocab_size:
        raise HerdError(f"draft model: vocabulary of {draft.args.vocab_size} tokens, the target's has "
                        f"{model.args.vocab_size}; expected a draft with the target's tokenizer")
    if draft.tok_embeddings.weight.device != model.tok_embeddings.weight.device:
        raise HerdError(f"draft model on {draft.tok_embeddings.weight.device}, the target on "
                        f"{model.tok_embeddings.weight.device}; expected both on one device")


def speculative_row(model, draft, prompt: Sequence[int], max_new_tokens: int, *, k: int, temperature: float,
                    top_p: float, top_k: int | None, generator: torch.Generator | None, stops: set[int],
                    on_token: Callable[[int], bool | None] | None, stats: dict) -> list[int]:
    """The new tokens of one row (see the module's docstring); ``stats`` gains proposed and accepted counts."""
    limit = min(model.args.max_seq_len, len(prompt) + max_new_tokens)
    target, small = _Cached(model, limit), _Cached(draft, min(draft.args.max_seq_len, limit))
    seq, new = list(prompt), []
    if len(seq) > 1:  # the target's cache holds every token but the last, which each round starts from
        target.feed(seq[:-1], last_only=True)
    greedy = temperature <= 0.0
    while True:
        room = min(max_new_tokens - len(new), limit - len(seq))  # tokens this row may still add
        # a round adds at most n_draft + 1 tokens; the draft writes up to position len(seq) + n_draft - 2, which its
        # context must hold (a draft with a shorter context than the target's stops proposing, the target goes on)
        n_draft = max(0, min(k, room - 1, small.length - len(seq) + 1))
        proposed, q = [], []
        if n_draft:  # the draft first reads what it has not seen: the prompt, then the 1 or 2 tokens of a round
            logits = small.feed(seq[small.done:], last_only=True)[-1]
        for i in range(n_draft):
            if greedy:
                tok = int(logits.argmax())
            else:
                q.append(distribution(logits, temperature, top_p, top_k))
                tok = int(torch.multinomial(q[-1], 1, generator=generator))
            proposed.append(tok)
            if i + 1 < n_draft:
                logits = small.feed([tok])[-1]
        verify = target.feed([seq[-1], *proposed])  # the target's p for positions len(seq) .. len(seq) + n_draft
        kept = []
        if greedy:
            choices = verify.argmax(dim=-1).tolist()
            for i, tok in enumerate(proposed):
                if tok != choices[i]:
                    break
                kept.append(tok)
            kept.append(choices[len(kept)])
        else:
            p = distribution(verify, temperature, top_p, top_k)
            for i, tok in enumerate(proposed):
                u = torch.rand((), generator=generator, device=p.device)
                if float(u) * float(q[i][tok]) <= float(p[i, tok]):  # kept with probability min(1, p / q)
                    kept.append(tok)
                    continue
                rest = (p[i] - q[i]).clamp(min=0)
                rest = rest / rest.sum() if float(rest.sum()) > 0 else p[i]
                kept.append(int(torch.multinomial(rest, 1, generator=generator)))
                break
            else:
                kept.append(int(torch.multinomial(p[n_draft], 1, generator=generator)))
        stats["proposed"] += n_draft
        stats["accepted"] += len(kept) - 1  # the last is the target's own: a correction or the bonus token
        stats["rounds"] += 1
        # the target's cache holds the row up to its new last token's predecessor; the draft's up to what it fed
        target.done = len(seq) + len(kept) - 1
        small.done = min(small.done, len(seq) + len(kept) - 1)
        for tok in kept:
            seq.append(tok)
            new.append(tok)
            if tok in stops or (on_token is not None and on_token(tok)) or len(new) >= max_new_tokens \
                    or len(seq) >= limit:
                return new

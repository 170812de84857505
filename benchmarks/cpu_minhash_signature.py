"""MinHash signatures on CPU: llamaherd's minhash_dedup against datatrove's MinhashDedupSignature, same documents.

Both compute, per document, word 5-gram shingles and a 14 x 8 MinHash signature (datatrove: its
default MinhashConfig, English word tokenizer, sha1-based 64-bit shingle hashes; llamaherd: lowercased
\\w+ words, BLAKE2b word hashes mixed into 64-bit shingle hashes). Documents: the Python standard
library's modules and documentation pages (the embedded corpus; code and prose), cut to 20,000
characters. Before timing, both must make the same decisions on planted near-duplicates: each of 200
documents gets a copy with one word in 150 changed, and both must find every pair as LSH candidates
(an equal band); the other pairs each finds are printed (ours also pairs a few modules' code with
their documentation page, which repeats the code's docstrings: Jaccard 0.4-0.6 under our shingles,
lower under datatrove's, whose simplified text drops punctuation). Timing: 1 process, interleaved rounds, median,
paired ratio.

    python benchmarks/cpu_minhash_signature.py          # ~2 minutes on a 2-core machine (needs datatrove, xxhash<4)
"""

from __future__ import annotations

import argparse
import random
import tempfile

import numpy as np
from common import fmt_table, interleaved, machine, paired_ratio, print_machine, stats, write_json

from llamaherd.data.curate.minhash_dedup import MinhashDedup
from llamaherd.data.stdlib_corpus import stdlib_documents


def datatrove_signer(folder: str):
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    step = MinhashDedupSignature(output_folder=folder, config=MinhashConfig())  # the folder stays unused
    return lambda text: step.get_signature(step.get_shingles(text))


def bands_of(signature) -> list[tuple]:
    """datatrove gives a list of bands (lists); ours a flat array: tuples of each band's values."""
    if isinstance(signature, np.ndarray):
        return [tuple(b) for b in signature.reshape(14, 8).tolist()]
    return [tuple(b) for b in signature]


def candidates(sign, texts: list[str]) -> set[tuple[int, int]]:
    """Pairs of documents that share at least one band."""
    seen: dict[tuple, int] = {}
    pairs = set()
    for i, text in enumerate(texts):
        for band, values in enumerate(bands_of(sign(text))):
            j = seen.setdefault((band, values), i)
            if j != i:
                pairs.add((j, i))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=600, help="documents per timed round")
    p.add_argument("--reps", type=int, default=5, help="timed rounds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    info = machine()
    print_machine(info)
    # datatrove's signature step cannot take a document of fewer words than one shingle: leave those out
    texts = [d.text[:20_000] for d in stdlib_documents("all") if len(d.text.split()) >= 10][: a.docs]
    print(f"documents: {len(texts)} (stdlib code and prose), {sum(map(len, texts)) / 1e6:.1f} M characters")
    ours_stage = MinhashDedup()
    ours, theirs = ours_stage.signature, datatrove_signer(tempfile.mkdtemp())

    rng = random.Random(0)
    base = [t for t in texts if len(t.split()) > 300][:200]
    planted = []
    for t in base:
        words = t.split()
        for _ in range(max(1, len(words) // 150)):
            words[rng.randrange(len(words))] = "CHANGED"
        planted += [t, " ".join(words)]
    want = {(2 * i, 2 * i + 1) for i in range(len(base))}
    found = {"llamaherd": candidates(ours, planted), "datatrove": candidates(theirs, planted)}
    decisions = {}
    for name, pairs in found.items():
        decisions[name] = {"copies_found": len(pairs & want), "copies": len(want), "other_pairs": len(pairs - want)}
        print(f"check: {name} finds {len(pairs & want)}/{len(want)} planted copies, {len(pairs - want)} other pairs")
    assert found["llamaherd"] & want == want and found["datatrove"] & want == want, "a planted copy was missed"

    times = interleaved({"llamaherd": lambda: [ours(t) for t in texts],
                         "datatrove": lambda: [theirs(t) for t in texts]}, reps=a.reps, warmup=1)
    rows, result = [], {"benchmark": "cpu_minhash_signature", "machine": info, "config": vars(a),
                        "decisions": decisions, "results": {}}
    for name, ts in times.items():
        r = paired_ratio(times["datatrove"], ts)
        rows.append([name, f"{len(texts) / stats(ts)['median']:,.0f}",
                     f"{r['median']:.1f}x ({r['min']:.1f}-{r['max']:.1f})"])
        result["results"][name] = {"seconds": ts, "docs_per_s": len(texts) / stats(ts)["median"],
                                   "speedup_vs_datatrove": r}
    print()
    print(fmt_table(["", "docs/s (median)", "speed vs datatrove (paired)"], rows))
    r = result["results"]["llamaherd"]["speedup_vs_datatrove"]
    print(f"\nratio llamaherd / datatrove MinHash signatures: {r['median']:.1f}x; target >= 10x: "
          f"{'met' if r['median'] >= 10 else 'NOT met'}")
    write_json(a.out, result)


if __name__ == "__main__":
    main()

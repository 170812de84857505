"""MinHash near-duplicate removal: the catch rate follows the LSH formula; clusters keep their first document."""

import json
import math
import random

import numpy as np
import pytest

from llamaherd.data.curate.minhash_dedup import MinhashDedup, choose_bands_rows, lsh_probability, shingle_hashes
from llamaherd.data.curate.pipeline import curate, load_pipeline, read_records
from llamaherd.errors import HerdError

VOCAB = [f"w{i}" for i in range(50_000)]  # large: unrelated documents share no shingle


def variant(words: list[str], changed: float, rng: random.Random) -> list[str]:
    """``words`` with about a fraction ``changed`` of them replaced by random others."""
    return [w if rng.random() > changed else rng.choice(VOCAB) for w in words]


def jaccard(a: str, b: str) -> float:
    x, y = set(shingle_hashes(a).tolist()), set(shingle_hashes(b).tolist())
    return len(x & y) / len(x | y)


def test_candidate_rate_at_each_similarity_matches_the_lsh_formula():
    """Pairs planted across similarities 0.3-1.0: within each similarity bin, the share of pairs that
    become candidates (an equal band) is the formula's mean over the bin, within 4 standard errors."""
    stage = MinhashDedup()  # 14 bands x 8 rows
    rng = random.Random(0)
    bins = np.linspace(0.3, 1.0, 8)
    seen: dict[int, list[tuple[float, bool]]] = {i: [] for i in range(len(bins) - 1)}
    for _ in range(1400):
        base = [rng.choice(VOCAB) for _ in range(rng.randint(150, 300))]
        other = variant(base, rng.uniform(0.0, 0.15), rng)
        a, b = " ".join(base), " ".join(other)
        s = jaccard(a, b)
        if not 0.3 <= s < 1.0:
            continue
        hashes = stage.band_hashes(np.stack([stage.signature(a), stage.signature(b)]))
        seen[int(np.searchsorted(bins, s, side="right")) - 1].append((s, bool((hashes[0] == hashes[1]).any())))
    checked = 0
    for i, pairs in seen.items():
        if len(pairs) < 40:
            continue
        expected = np.array([lsh_probability(s, 14, 8) for s, _ in pairs])
        observed = sum(hit for _, hit in pairs)
        sigma = math.sqrt(float((expected * (1 - expected)).sum())) + 1.0
        assert abs(observed - expected.sum()) <= 4 * sigma, (bins[i], len(pairs), observed, expected.sum())
        checked += 1
    assert checked >= 5  # most of the curve, including its steep middle, was checked
    # and unrelated documents essentially never become candidates
    lone = np.stack([stage.signature(" ".join(rng.choice(VOCAB) for _ in range(200))) for _ in range(300)])
    hashes = stage.band_hashes(lone)
    assert all(len(set(hashes[:, band].tolist())) == 300 for band in range(14))


def changed(words: list[str], positions, rng: random.Random) -> list[str]:
    """A copy of ``words`` with the words at ``positions`` replaced by random others."""
    out = words[:]
    for p in positions:
        out[p] = rng.choice(VOCAB)
    return out


def cluster_corpus(rng: random.Random) -> tuple[list[dict], dict[str, str | None]]:
    """Originals, each followed later by near copies (one word in 200 changed: Jaccard ~0.95, so caught
    with probability 1 - 3e-7); unrelated documents between them.
    Returns the records and the id each must be recorded as a duplicate of (None: kept)."""
    records, want = [], {}
    originals = []
    for i in range(60):
        words = [rng.choice(VOCAB) for _ in range(200)]
        originals.append((f"orig{i}", words))
        records.append({"id": f"orig{i}", "text": " ".join(words)})
        want[f"orig{i}"] = None
        records.append({"id": f"unrelated{i}", "text": " ".join(rng.choice(VOCAB) for _ in range(200))})
        want[f"unrelated{i}"] = None
    for i, (orig_id, words) in enumerate(originals):
        for k in range(i % 3):
            copy_id = f"copy{i}_{k}"
            records.append({"id": copy_id, "text": " ".join(changed(words, [rng.randrange(200)], rng))})
            want[copy_id] = orig_id
    return records, want


def test_near_copies_are_removed_in_favour_of_the_first_document_of_their_cluster(tmp_path):
    rng = random.Random(1)
    records, want = cluster_corpus(rng)
    # a chain of 13 documents, each 4 words (of 400) away from the one before (Jaccard ~0.9, caught with
    # probability 0.9996): the ends share a quarter of their shingles, yet all are one cluster, kept as
    # its first document in input order, the last link of the chain
    links = [[rng.choice(VOCAB) for _ in range(400)]]
    positions = rng.sample(range(400), 48)
    for step in range(12):
        links.append(changed(links[-1], positions[4 * step: 4 * step + 4], rng))
    for k, words in reversed(list(enumerate(links))):
        records.append({"id": f"link{k}", "text": " ".join(words)})
        want[f"link{k}"] = None if k == 12 else "link12"
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = curate(load_pipeline(stages=["minhash_dedup"], overrides=["output.shard_docs=25"]), [src],
                   tmp_path / "out", workers=2)
    removed = {r["id"]: r for path in sorted((tmp_path / "out" / "removed").iterdir()) for r in read_records(path)}
    assert {i: r["duplicate_of"] for i, r in removed.items()} == {i: k for i, k in want.items() if k}
    assert all(r["reason"] == "near_duplicate" for r in removed.values())
    assert stats["stages"][0]["documents"] == {"in": len(records), "kept": len(records) - len(removed),
                                               "removed": {"near_duplicate": len(removed)}}
    assert jaccard(" ".join(links[0]), " ".join(links[-1])) < 0.5  # the ends alone would hardly be paired


def test_bands_and_rows_for_a_threshold():
    for threshold in (0.5, 0.6, 0.7, 0.8, 0.9):
        bands, rows = choose_bands_rows(threshold, 112)
        assert bands * rows <= 112
        # the S-curve rises through the threshold: rarely a candidate well below it, almost surely above
        assert lsh_probability(threshold - 0.2, bands, rows) < 0.25 < 0.75 < lsh_probability(threshold + 0.15,
                                                                                             bands, rows)
    assert choose_bands_rows(0.5, 112) != choose_bands_rows(0.9, 112)
    stage = MinhashDedup(threshold=0.8)
    assert (stage.num_buckets, stage.hashes_per_bucket) == choose_bands_rows(0.8, 112) and stage.threshold is None
    with pytest.raises(HerdError, match="threshold"):
        MinhashDedup(threshold=1.5)


def test_signatures_are_deterministic_and_seeded():
    text = " ".join(random.Random(2).choice(VOCAB) for _ in range(100))
    assert np.array_equal(MinhashDedup().signature(text), MinhashDedup().signature(text))
    assert not np.array_equal(MinhashDedup(seed=2).signature(text), MinhashDedup().signature(text))
    assert len(shingle_hashes("one two three")) == 1 and len(shingle_hashes("")) == 0
    assert len(shingle_hashes("a b c d e f g")) == 3  # word 5-grams

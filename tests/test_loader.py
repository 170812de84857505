"""The pretraining loader (llamaherd.data.loader): rows cut from the shuffled document stream."""

import json
import time

import numpy as np
import pytest
import tiktoken
import torch

from llamaherd.data.loader import IGNORE_INDEX, PackedLoader, iter_eval_batches
from llamaherd.data.pack import PackedDataset, pack_documents
from llamaherd.errors import HerdError

BOS, EOS = 256, 257


class ByteTokenizer:
    """A tokenizer-like stub: tiktoken over the 256 byte tokens; bos 256, eos 257."""

    n_words, bos_id, eos_id = 258, BOS, EOS

    def __init__(self):
        self.enc = tiktoken.Encoding(
            name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
        )

    def encode_batch(self, texts, bos, eos, num_threads=8):
        return [[BOS] + t + [EOS] for t in self.enc.encode_ordinary_batch(texts, num_threads=num_threads)]


def make_dataset(path, n_docs, max_len, seed=0, shard_tokens=1000):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghij klmnop"))
    texts = ["".join(rng.choice(letters, size=rng.integers(0, max_len))) for _ in range(n_docs)]
    pack_documents(texts, ByteTokenizer(), path, shard_tokens=shard_tokens, progress=False)
    return PackedDataset(path)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):  # ~90 documents of 2..151 tokens in several shards
    return make_dataset(tmp_path_factory.mktemp("ds"), 90, 150)


def reference_stream(ds, loader, epochs):
    """The shuffled-document stream built the slow, obvious way: tokens and document-start flags."""
    docs = [ds.doc(i) for e in range(epochs) for i in loader.order(e)]
    starts = [np.arange(len(d)) == 0 for d in docs]
    return np.concatenate(docs).astype(np.int64), np.concatenate(starts)


def full_rows(batch):
    """The seq_len+1 tokens of each row, recovered from inputs and targets (an ignored target is a bos)."""
    last = batch.targets[:, -1:].clone()
    last[last == IGNORE_INDEX] = BOS
    return torch.cat([batch.inputs, last], dim=1).numpy()


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return all(
        torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets) and torch.equal(x.doc_ids, y.doc_ids)
        for x, y in zip(a, b, strict=True)
    )


def test_rows_are_the_shuffled_document_stream(ds):
    B, S = 3, 40
    loader = PackedLoader(ds, B, S, seed=7)
    n_batches = 3 * ds.n_tokens // (B * (S + 1))  # about three epochs
    batches = take(loader, n_batches)
    want, want_starts = reference_stream(ds, loader, 5)
    rows = np.concatenate([full_rows(b) for b in batches])
    served = np.array([loader.row_index(i) for i in range(len(rows))])
    # every served row is a slice of the stream, rows of each block come in a permuted order, and over
    # whole blocks no row is missing or repeated
    R = loader.block_rows
    assert R == ds.n_tokens // (S + 1)
    stream_rows = want[: (served.max() + 1) * (S + 1)].reshape(-1, S + 1)
    assert np.array_equal(rows, stream_rows[served])
    whole = len(rows) // R * R
    assert np.array_equal(np.sort(served[:whole]), np.arange(whole))
    assert not np.array_equal(served[:R], np.arange(R))  # shuffled: not the stream order
    assert np.all(served[:whole] // R == np.arange(whole) // R)  # a block's rows stay in that block
    starts = want_starts[: (served.max() + 1) * (S + 1)].reshape(-1, S + 1)[served]
    inputs = torch.cat([b.inputs for b in batches]).numpy()
    targets = torch.cat([b.targets for b in batches]).numpy()
    doc_ids = torch.cat([b.doc_ids for b in batches]).numpy()
    assert batches[0].inputs.shape == batches[0].targets.shape == batches[0].doc_ids.shape == (B, S)
    assert (batches[0].inputs.dtype, batches[0].targets.dtype, batches[0].doc_ids.dtype) == (
        torch.int64, torch.int64, torch.int32)
    # targets are the inputs shifted by one, except where the next token starts another document
    assert np.array_equal(targets == IGNORE_INDEX, starts[:, 1:])
    assert np.array_equal(targets[~starts[:, 1:]], rows[:, 1:][~starts[:, 1:]])
    assert np.array_equal(inputs, rows[:, :-1])
    # doc_ids start at 0 in each row and go up by one exactly where a document starts
    assert (doc_ids[:, 0] == 0).all()
    assert np.array_equal(np.diff(doc_ids, axis=1), starts[:, 1:-1].astype(np.int32))
    # rows with documents continued from the previous row exist, and still start at id 0
    assert (~starts[:, 0]).any()
    # each epoch is a fresh permutation of all the documents
    orders = [loader.order(e) for e in range(3)]
    assert all(np.array_equal(np.sort(o), np.arange(ds.n_docs)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    assert loader.state_dict()["batches"] == n_batches


def test_same_seed_same_batches_other_seed_other_batches(ds):
    assert same(take(PackedLoader(ds, 2, 33, seed=3), 20), take(PackedLoader(ds, 2, 33, seed=3), 20))
    assert not same(take(PackedLoader(ds, 2, 33, seed=3), 5), take(PackedLoader(ds, 2, 33, seed=4), 5))
    # seeds are not shifted epochs of one another
    assert not np.array_equal(PackedLoader(ds, 2, 33, seed=1).order(0), PackedLoader(ds, 2, 33, seed=0).order(1))
    unshuffled = PackedLoader(ds, 2, 33, shuffle=False)
    assert np.array_equal(unshuffled.order(5), np.arange(ds.n_docs))
    assert np.array_equal(full_rows(next(unshuffled)).reshape(-1), np.concatenate([ds.doc(i) for i in range(5)])[:68])
    assert [unshuffled.row_index(i) for i in range(10)] == list(range(10))


def test_ranks_get_disjoint_rows_that_make_up_the_global_batch(ds):
    B, S, W = 2, 30, 3
    whole = take(PackedLoader(ds, W * B, S, seed=5), 50)  # 50 x 186 tokens: crosses an epoch boundary
    per_rank = [take(PackedLoader(ds, B, S, seed=5, rank=r, world_size=W), 50) for r in range(W)]
    for g in range(50):
        for r in range(W):
            part, rows = per_rank[r][g], slice(r * B, (r + 1) * B)
            assert torch.equal(part.inputs, whole[g].inputs[rows])
            assert torch.equal(part.targets, whole[g].targets[rows])
            assert torch.equal(part.doc_ids, whole[g].doc_ids[rows])


@pytest.mark.parametrize("world_size,rank", [(1, 0), (2, 1)])
def test_resume_continues_with_exactly_the_next_batch(ds, world_size, rank):
    B, S, n = 3, 60, 4

    def make():
        return PackedLoader(ds, B, S, seed=11, rank=rank, world_size=world_size)

    uninterrupted, reference, states = make(), [], []
    for _ in range(50):  # more than one epoch (37 batches a rank at world_size 1, 19 at 2)
        states.append(uninterrupted.state_dict())
        reference.append(next(uninterrupted))
    rows_per_batch = B * world_size
    per_block = uninterrupted.block_rows / rows_per_batch
    crossing = [k for k in range(45) if int(k * rows_per_batch // uninterrupted.block_rows)
                != int(((k + 1) * rows_per_batch - 1) // uninterrupted.block_rows)]
    assert crossing and per_block < 45  # batch k takes rows from two shuffle blocks
    rng = np.random.default_rng(0)
    cuts = sorted({0, 1, 45, *crossing, *(k + 1 for k in crossing), *rng.integers(0, 46, size=6).tolist()})
    for k in cuts:
        before = make()
        take(before, k)
        state = json.loads(json.dumps(before.state_dict()))
        assert state == states[k] and state["batches"] == k
        after = make()
        after.load_state_dict(state)
        assert same(take(after, n), reference[k : k + n]), f"resume after {k} batches"
        take(before, n)
        assert after.state_dict() == before.state_dict()


def test_mismatched_state_is_refused(ds, tmp_path):
    loader = PackedLoader(ds, 2, 16, seed=1, world_size=2)
    take(loader, 3)
    state = loader.state_dict()
    for kwargs, key in [
        (dict(batch_size=2, seq_len=17, seed=1, world_size=2), "seq_len"),
        (dict(batch_size=2, seq_len=16, seed=2, world_size=2), "seed"),
        (dict(batch_size=2, seq_len=16, seed=1, world_size=2, shuffle=False), "shuffle"),
    ]:
        other = PackedLoader(ds, **kwargs)
        with pytest.raises(HerdError, match=f"loader state has {key}=.* but this loader has {key}="):
            other.load_state_dict(state)
    for kwargs in (dict(batch_size=3, world_size=2), dict(batch_size=2, world_size=1)):  # other global batches
        with pytest.raises(HerdError, match=r"global batches of 4 rows \(batch_size 2 x world_size 2\) but this "
                                            r"loader's have [26]"):
            PackedLoader(ds, seq_len=16, seed=1, **kwargs).load_state_dict(state)
    with pytest.raises(HerdError, match="loader state has n_docs=90 but this loader has n_docs=10"):
        PackedLoader(make_dataset(tmp_path, 10, 50), 2, 16, seed=1, world_size=2).load_state_dict(state)
    fresh = PackedLoader(ds, 2, 16, seed=1, world_size=2, rank=1)
    fresh.load_state_dict(state)  # the position is global: a state saved by any rank resumes every rank
    # the same global batches laid out over other ranks: one rank of 4 rows takes up exactly where 2 x 2 left off
    alone = PackedLoader(ds, 4, 16, seed=1)
    alone.load_state_dict(state)
    ranks = [PackedLoader(ds, 2, 16, seed=1, world_size=2, rank=r) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    for _ in range(3):
        whole, parts = next(alone), [next(r) for r in ranks]
        assert torch.equal(whole.inputs, torch.cat([p.inputs for p in parts]))
        assert torch.equal(whole.targets, torch.cat([p.targets for p in parts]))
    with pytest.raises(HerdError, match="missing 'seed'"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "seed"})
    with pytest.raises(HerdError, match="non-negative integer"):
        fresh.load_state_dict({**state, "batches": -1})
    with pytest.raises(HerdError, match="version"):
        fresh.load_state_dict({"epoch": 0})


def test_dataset_smaller_than_one_row_is_refused(tmp_path):
    pack_documents(["abc", "de"], ByteTokenizer(), tmp_path, progress=False)  # 9 tokens
    with pytest.raises(HerdError, match="dataset has 9 tokens, fewer than one row of seq_len\\+1 = 10"):
        PackedLoader(tmp_path, 1, 9)
    PackedLoader(tmp_path, 1, 8)
    for kwargs in (dict(batch_size=0, seq_len=4), dict(batch_size=1, seq_len=0), dict(batch_size=1, seq_len=4, rank=1)):
        with pytest.raises(HerdError):
            PackedLoader(tmp_path, **kwargs)


def test_batches_larger_than_an_epoch(tmp_path):
    pack_documents(["abcdef", "gh", "ijklmnopq", "r"], ByteTokenizer(), tmp_path, progress=False)
    ds = PackedDataset(tmp_path)  # 26 tokens: every batch of 4 x 16 spans several epochs
    loader = PackedLoader(tmp_path, 4, 15, seed=1)
    batches = take(loader, 5)
    want, starts = reference_stream(ds, loader, 5 * 64 // ds.n_tokens + 2)
    assert np.array_equal(np.concatenate([full_rows(b) for b in batches]).reshape(-1), want[: 5 * 64])
    resumed = PackedLoader(tmp_path, 4, 15, seed=1)
    first = PackedLoader(tmp_path, 4, 15, seed=1)
    take(first, 3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert same(take(resumed, 2), batches[3:5])


def test_eval_batches_cover_the_dataset_once_in_order(ds):
    B, S = 4, 37
    batches = list(iter_eval_batches(ds, B, S))
    again = list(iter_eval_batches(ds.path, B, S))
    assert same(batches, again)
    want = np.concatenate([ds.doc(i) for i in range(ds.n_docs)])
    n_rows = -(-ds.n_tokens // (S + 1))
    assert sum(len(b.inputs) for b in batches) == n_rows and len(batches) == -(-n_rows // B)
    rows = np.concatenate([full_rows(b) for b in batches]).reshape(-1)
    assert np.array_equal(rows[: ds.n_tokens], want)
    # targets: the next token, ignored where it starts a document or is padding
    pad = n_rows * (S + 1) - ds.n_tokens
    starts = np.zeros(n_rows * (S + 1), bool)
    starts[np.cumsum(ds.doc_len)[:-1]] = True
    starts[ds.n_tokens :] = True
    starts = starts.reshape(n_rows, S + 1)[:, 1:]
    targets = torch.cat([b.targets for b in batches]).numpy()
    assert np.array_equal(targets == IGNORE_INDEX, starts)
    assert np.array_equal(targets[~starts], rows.reshape(n_rows, S + 1)[:, 1:][~starts])
    assert pad > 0 and (batches[-1].targets[-1, S - pad :] == IGNORE_INDEX).all()
    assert len(list(iter_eval_batches(ds, B, S, max_batches=2))) == 2


def test_speed_of_an_8_by_512_batch(tmp_path):
    ds = make_dataset(tmp_path, 2000, 400, seed=3, shard_tokens=100_000)  # ~400K tokens in 4 shards
    loader = PackedLoader(ds, 8, 512, seed=0)
    take(loader, 5)
    t0 = time.perf_counter()
    take(loader, 200)
    per_batch = (time.perf_counter() - t0) / 200
    print(f"8x512 batch: {per_batch * 1e6:.0f} us")
    assert per_batch < 5e-3  # typically well under 1 ms; generous for a loaded machine

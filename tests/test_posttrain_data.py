"""Post-training data: loss masks on assistant turns only, packing that keeps conversations apart, the
resumable loader, and one-line errors for bad records."""

import json
import types

import pytest
import torch

from llamaherd.data.loader import IGNORE_INDEX
from llamaherd.errors import HerdError
from llamaherd.model.args import preset
from llamaherd.model.masks import doc_mask, doc_positions
from llamaherd.model.transformer import Transformer
from llamaherd.posttrain.data import (
    ChatLoader,
    PairLoader,
    chat_format,
    encode_conversation,
    encode_pair,
    encode_records,
    eval_batches,
    pack,
    read_records,
    to_messages,
    to_preference,
)
from llamaherd.tokenizer import Tokenizer

TOK = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
CHAT = chat_format(TOK)
DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
          {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And json.dumps?"},
          {"role": "assistant", "content": " Serialize obj. "}]


def test_only_assistant_content_and_its_eot_carry_loss():
    ex = encode_conversation(CHAT, DIALOG)
    assert ex.ids == CHAT.encode_dialog_prompt(DIALOG, add_generation_prompt=False)  # the chat format itself
    learned = [t for t, keep in zip(ex.ids, ex.loss, strict=True) if keep]
    assert TOK.decode(learned) == "Hello.<|eot_id|>Serialize obj.<|eot_id|>"
    no_eot = encode_conversation(CHAT, DIALOG, eot_loss=False)  # DPO's log-probabilities: content only
    assert TOK.decode([t for t, keep in zip(no_eot.ids, no_eot.loss, strict=True) if keep]) == "Hello.Serialize obj."


def test_targets_are_the_next_token_where_it_carries_loss():
    ex = encode_conversation(CHAT, DIALOG)
    inputs, targets, doc_ids = next(pack([ex], [0], 128))
    n = len(ex) - 1
    assert inputs[:n].tolist() == ex.ids[:-1] and (doc_ids[:n] == 0).all() and (doc_ids[n:] == 1).all()
    for i in range(n):
        assert targets[i] == (ex.ids[i + 1] if ex.loss[i + 1] else IGNORE_INDEX)
    assert (targets[n:] == IGNORE_INDEX).all()  # padding learns nothing


def test_packed_conversations_never_attend_across_each_other():
    """Each conversation's logits in a packed row equal its logits alone: no attention across documents,
    positions restart at each."""
    args = preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TOK.n_words, multiple_of=32)
    model = Transformer(args)
    model.init_rope()
    model.init_weights(std=0.5, seed=1)
    model.eval()
    a = encode_conversation(CHAT, DIALOG)
    b = encode_conversation(CHAT, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    rows = list(pack([a, b], [0, 1], len(a) + len(b)))
    assert len(rows) == 1  # both in one row
    inputs, _, doc_ids = (torch.from_numpy(x)[None] for x in rows[0])
    with torch.no_grad():
        packed = model(inputs, doc_positions(doc_ids), mask=doc_mask(doc_ids))[0]
        alone_a = model(torch.tensor([a.ids[:-1]]))[0]
        alone_b = model(torch.tensor([b.ids[:-1]]))[0]
    na, nb = len(a) - 1, len(b) - 1
    torch.testing.assert_close(packed[:na], alone_a, atol=1e-4, rtol=1e-4)  # float32 sums in another order
    torch.testing.assert_close(packed[na:na + nb], alone_b, atol=1e-4, rtol=1e-4)  # float32 sums in another order


def test_rows_are_filled_whole_and_long_examples_cut():
    exs = [encode_conversation(CHAT, [{"role": "user", "content": "q" * k}, {"role": "assistant", "content": "a"}])
           for k in (5, 10, 200)]
    rows = list(pack(exs, [0, 1, 2], 64))
    assert len(rows) == 2  # the first two share a row; the long one is cut to its own
    assert rows[1][0].tolist() == exs[2].ids[:64] and rows[1][2].max() == 0


def test_the_loader_resumes_exactly_and_ranks_take_different_rows():
    exs = [encode_conversation(CHAT, [{"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                                      {"role": "assistant", "content": f"answer {i}"}]) for i in range(40)]
    loader = ChatLoader(exs, 48, 2, seed=3)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(30)]  # past an epoch: the order is drawn again
    again = ChatLoader(exs, 48, 2, seed=3)
    again.load_state_dict(state)
    for want in expected:
        got = next(again)
        assert all(torch.equal(x, y) for x, y in zip(vars(got).values(), vars(want).values(), strict=True))
    r0, r1 = ChatLoader(exs, 48, 2, seed=3, rank=0, world=2), ChatLoader(exs, 48, 2, seed=3, rank=1, world=2)
    whole = ChatLoader(exs, 48, 4, seed=3)
    for _ in range(5):
        w = next(whole)
        assert torch.equal(torch.cat([next(r0).inputs, next(r1).inputs]), w.inputs)
    assert sum(b.inputs.shape[0] for b in eval_batches(exs, 48, 4)) == len(list(pack(exs, range(40), 48)))


def test_the_pair_loader_serves_each_pair_once_an_epoch_grouped_by_length_and_resumes_exactly():
    def pair(i):  # most pairs short, one in five long
        answer = ("x" * 150) if i % 5 == 0 else f"a{i}"
        return encode_pair(CHAT, {"prompt": [{"role": "user", "content": f"q{i}"}],
                                  "chosen": [{"role": "assistant", "content": answer}],
                                  "rejected": [{"role": "assistant", "content": answer + "!"}]})

    pairs = [pair(i) for i in range(160)]
    grouped, plain = PairLoader(pairs, 256, 4, seed=1), PairLoader(pairs, 256, 4, seed=1, group=1)
    for loader in (grouped, plain):
        epoch = [next(loader) for _ in range(40)]
        served = torch.cat([b.index for b in epoch]).tolist()
        assert sorted(served) == list(range(160))  # every pair once
        loader.width = sum(b.tokens.shape[1] for b in epoch)  # the padded length served in the epoch
    assert grouped.width < 0.6 * plain.width  # short pairs are batched with short ones
    state = grouped.state_dict()
    expected = [next(grouped) for _ in range(50)]  # into the third epoch: drawn again
    again = PairLoader(pairs, 256, 4, seed=1)
    again.load_state_dict(state)
    for want in expected:
        got = next(again)
        assert all(torch.equal(x, y) for x, y in zip(vars(got).values(), vars(want).values(), strict=True))


def test_records_in_trl_formats(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": DIALOG}, {"prompt": "What is 2+2?", "completion": "4"},
            {"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = list(read_records(path))
    assert [w for w, _ in records] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert to_messages(records[1][1]) == [{"role": "user", "content": "What is 2+2?"},
                                          {"role": "assistant", "content": "4"}]
    pytest.importorskip("pyarrow", reason="Parquet needs the data extra")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": DIALOG}]), tmp_path / "chat.parquet")
    assert to_messages(next(read_records(tmp_path / "chat.parquet"))[1]) == DIALOG


def test_bad_input_is_a_one_line_error_or_a_counted_skip(tmp_path):
    with pytest.raises(HerdError, match="has no assistant turn"):
        encode_conversation(CHAT, [{"role": "user", "content": "hello?"}])
    with pytest.raises(HerdError, match="chosen and rejected are the same"):
        to_preference({"prompt": "q", "chosen": "same", "rejected": "same"})
    with pytest.raises(HerdError, match="missing: rejected"):
        to_preference({"prompt": "q", "chosen": "a"})
    with pytest.raises(HerdError, match=r"no <\|start_header_id\|>.*chat special tokens"):
        chat_format(types.SimpleNamespace(special_tokens={"<|begin_of_text|>": 0, "<|eot_id|>": 1}))
    with pytest.raises(HerdError, match="role 'wizard'"):
        to_messages({"messages": [{"role": "wizard", "content": "x"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n{not json\n')
    with pytest.raises(HerdError, match=r"bad.jsonl:2: not valid JSON"):
        list(read_records(bad))
    errors = []
    records = [("a:1", {"messages": [{"role": "user", "content": "no answer"}]}), ("a:2", {"messages": DIALOG})]
    examples, skipped = encode_records(CHAT, records, on_error=errors.append)
    assert len(examples) == 1 and skipped == 1 and errors == ["a:1: has no assistant turn, so nothing to learn from"]
    with pytest.raises(HerdError, match="file not found"):
        list(read_records(tmp_path / "missing.jsonl"))

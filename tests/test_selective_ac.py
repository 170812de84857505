"""train.ac_policy: full, per-operation selective ("op") and every N-th block activation checkpointing. Each gives
the un-checkpointed model's loss and gradients bit for bit; the memory held for the backward is ordered
none > op > full, with every-2nd between none and full, and "op" keeps exactly what the memory model
(``plan.op_saved``) counts; a bad policy is a one-line error; the trainer runs with it."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llamaherd.config import load_config, model_args
from llamaherd.errors import HerdError
from llamaherd.model.args import ModelArgs
from llamaherd.model.transformer import Transformer
from llamaherd.train.parallel import ac_policy, apply_activation_checkpointing, build_model
from llamaherd.train.plan import op_saved
from llamaherd.train.pretrain import pretrain

DIM, KV_HEADS, HEADS, FFN = 64, 2, 4, 192
TOKENS = (2, 32)  # batch, sequence


def model(policy: str | None, n_layers: int = 4) -> Transformer:
    """A seeded model (float32, the CPU), checkpointed with ``policy`` (None: not at all)."""
    args = ModelArgs(dim=DIM, n_layers=n_layers, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=128, multiple_of=64,
                     max_seq_len=64)
    m = Transformer(args)
    m.init_weights(seed=0)
    assert m.layers[0].feed_forward.w1.out_features == FFN
    if policy is not None:
        apply_activation_checkpointing(m, policy)
    return m


def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (TOKENS[0], TOKENS[1] + 1), generator=torch.Generator().manual_seed(0))


class HeldForBackward(TorchDispatchMode):
    """The bytes of the tensors a forward pass creates that are still alive after it: what autograd (or a
    checkpoint's selective storage) holds for the backward, plus the output. Storages are counted once, through
    weak references; the model's own parameters and buffers are not counted.

    (``torch.autograd.graph.saved_tensors_hooks`` cannot count this: inside a checkpointed block the checkpoint's
    own hooks take the saved tensors, and a selective checkpoint keeps its saved outputs outside autograd.)"""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
        self.created: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.known:
                s = t.untyped_storage()
                self.created.setdefault(s._cdata, (StorageWeakRef(s), s.nbytes()))
        return out

    def alive(self) -> int:
        return sum(n for ref, n in self.created.values() if not ref.expired())


def held_bytes(policy: str | None, n_layers: int = 4) -> int:
    m = model(policy, n_layers)
    x = tokens()[:, :-1]
    counter = HeldForBackward(m)
    with counter:
        out = m(x)
    held = counter.alive()
    del out
    return held


@pytest.mark.parametrize("policy", ["full", "op", "2", "3"])
def test_every_policy_gives_the_uncheckpointed_loss_and_gradients(policy):
    results = []
    for p in (None, policy):
        m = model(p)
        t = tokens()
        loss = F.cross_entropy(m(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
        loss.backward()
        results.append((loss, {name: q.grad for name, q in m.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:  # float32 on the CPU: the same operations on the same numbers, bit for bit
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_every_nth_block_is_checkpointed_and_the_rest_are_not():
    m = model("2")
    wrapped = [isinstance(b.forward, functools.partial) for b in m.layers]
    assert wrapped == [False, True, False, True]
    assert all(isinstance(b.forward, functools.partial) for b in model("1").layers)
    assert all(b.forward.keywords.get("context_fn") is not None for b in model("op").layers)


def test_memory_held_for_the_backward_is_ordered_none_op_full():
    none, op, full, every2 = (held_bytes(p) for p in (None, "op", "full", "2"))
    assert none > op > full and none > every2 > full, (none, op, every2, full)
    # per layer and token (the difference 4 layers - 2 layers makes the embedding, head and logits cancel):
    tokens_n = TOKENS[0] * TOKENS[1]
    per_layer = {p: (held_bytes(p, 4) - held_bytes(p, 2)) / 2 / tokens_n for p in (None, "op", "full", "2")}
    kv = KV_HEADS * DIM // HEADS
    # full: only the block's input; op: its input, the matmuls' and attention's outputs (``op_saved``) and
    # attention's log-sum-exp (a float per head); every 2nd: the mean of the two
    assert per_layer["full"] == 4 * DIM
    assert per_layer["op"] == 4 * op_saved(DIM, kv, FFN) + 4 * HEADS
    assert per_layer["2"] == (per_layer[None] + per_layer["full"]) / 2
    assert per_layer[None] > per_layer["op"] > per_layer["full"]


def test_a_bad_policy_is_a_one_line_error():
    for bad in ["x", "0", "-1", "1.5", "", "Full", "²"]:
        with pytest.raises(HerdError, match=rf"^train.ac_policy {bad!r}: expected full, op or a positive integer "
                                            r"\(every N-th block\)$"):
            ac_policy(bad)
    assert [ac_policy(p) for p in ("full", "op", "1", "12")] == ["full", "op", 1, 12]
    cfg = load_config("tiny", ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "train.ac_policy=sometimes"])
    with pytest.raises(HerdError, match="train.ac_policy 'sometimes'"):  # wherever a model is built
        build_model(model_args(cfg, vocab_size=128), cfg, torch.device("cpu"))


def settings(corpus, **extra) -> list[str]:
    base = {"model.dim": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2, "model.multiple_of": 32,
            "data.train_dir": corpus / "train", "data.val_dir": corpus / "val",
            "tokenizer.path": corpus / "tokenizer.model", "train.steps": 4, "train.batch_size": 4,
            "train.seq_len": 64, "train.warmup_steps": 2, "train.log_every": 1, "train.eval_every": 4,
            "train.eval_batches": 1, "checkpoint.every": 4, **extra}
    return [f"{k}={v}" for k, v in base.items()]


def losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_runs_with_op_checkpointing_and_gets_the_same_losses(byte_corpus, tmp_path):
    pretrain(load_config("tiny", settings(byte_corpus)), tmp_path / "plain", progress=False)
    pretrain(load_config("tiny", settings(byte_corpus, **{"train.activation_checkpointing": "true",
                                                           "train.ac_policy": "op"})), tmp_path / "op", progress=False)
    assert len(losses(tmp_path / "op")) == 4 and losses(tmp_path / "op") == losses(tmp_path / "plain")


def test_a_bad_policy_fails_the_run_before_any_work(byte_corpus, tmp_path):
    with pytest.raises(HerdError, match=r"train.ac_policy 'x': expected full, op or a positive integer"):
        pretrain(load_config("tiny", settings(byte_corpus, **{"train.activation_checkpointing": "true",
                                                               "train.ac_policy": "x"})), tmp_path / "r",
                 progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("policy", ["op", "full"])
def test_checkpointing_float8_blocks_gives_their_loss_and_gradients(policy):
    pytest.importorskip("torchao.float8")
    shape = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.multiple_of=32",
             "train.float8=true"]
    results = []
    for extra in ([], ["train.activation_checkpointing=true", f"train.ac_policy={policy}"]):
        cfg = load_config("tiny", shape + extra)
        m = build_model(model_args(cfg, vocab_size=128), cfg, torch.device("cpu"))
        t = tokens()
        loss = F.cross_entropy(m(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())
        loss.backward()
        results.append((loss, [p.grad for p in m.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    # "op" keeps the float8 matmuls' outputs; the casts to float8 are recomputed, to the same scales and bits
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))

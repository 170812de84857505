"""The Trainer: one loop for every training stage. A loss other than pretraining's runs through the very
same loop (and resumes exactly); pretraining is that loop; models are built on the meta device."""

import io
import json
import signal
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_args

from llamaherd.checkpoint import runs
from llamaherd.config import load_config
from llamaherd.model.transformer import Transformer
from llamaherd.train.losses import LossOutput
from llamaherd.train.parallel import build_model
from llamaherd.train.trainer import Trainer

LABELS = 10  # the toy task's labels are token ids 10..13


@dataclass
class LabelledRows:
    tokens: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B]

    def to(self, device, non_blocking=False):
        return LabelledRows(self.tokens.to(device), self.labels.to(device))


class ToyStream:
    """An endless, seeded stream of rows of random tokens, each labelled by its last token (mod 4)."""

    def __init__(self, batch=16, seq=8, seed=0):
        self.batch, self.seq, self.seed, self.served = batch, seq, seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> LabelledRows:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.served)
        self.served += 1
        tokens = torch.randint(20, 28, (self.batch, self.seq), generator=gen)
        return LabelledRows(tokens, LABELS + tokens[:, -1] % 4)

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]


def last_token_loss(model, batch: LabelledRows) -> LossOutput:
    """A classification loss, not next-token prediction: one label per row, read at its last position."""
    logits = model(batch.tokens, last_only=True)[:, -1]
    accuracy = (logits.argmax(-1) == batch.labels).float().mean()
    return LossOutput(F.cross_entropy(logits.float(), batch.labels), batch.labels.numel(), {"accuracy": accuracy})


def toy_trainer(run_dir, steps, loss=last_token_loss, **kw):
    cfg = load_config(None, [f"train.steps={steps}", "train.lr=0.01", "train.warmup_steps=2", "train.log_every=1",
                             "train.eval_every=5", "checkpoint.every=4", "checkpoint.keep=5"])
    model = build_model(tiny_model_args(), cfg, torch.device("cpu"))
    evaluation = [next(ToyStream(seed=99)) for _ in range(2)]
    return Trainer(model, loss, ToyStream(), cfg, run_dir, eval_data=lambda: iter(evaluation),
                   progress=False, **kw)


@pytest.mark.usefixtures("one_thread")
def test_a_second_loss_trains_through_the_same_loop_and_resumes_exactly(tmp_path):
    trainer = toy_trainer(tmp_path / "a", steps=30)
    result = trainer.fit()
    records = [r for r in runs_metrics(tmp_path / "a") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 31)) and result.step == 30
    first, last = records[0], records[-5:]
    assert sum(r["loss"] for r in last) / 5 < 0.5 * first["loss"]  # it learns the task
    assert sum(r["accuracy"] for r in last) / 5 > 0.8 > first["accuracy"]  # the loss's own metric is logged
    vals = [r for r in runs_metrics(tmp_path / "a") if "val_loss" in r]
    assert [r["step"] for r in vals] == [5, 10, 15, 20, 25, 30] and vals[-1]["val_bpb"] is None
    assert vals[-1]["val_loss"] == pytest.approx(result.val_loss) and result.val_loss < vals[0]["val_loss"]
    assert [p.name for p in runs.checkpoint_dirs(tmp_path / "a")][:2] == ["step_0000030", "step_0000028"]

    # SIGTERM during step 11: the Trainer checkpoints after it and stops; a new Trainer resumes from there
    # and ends with the same weights and log as the run never stopped
    trained = []

    def interrupted(model, batch):
        trained.append(model.training)
        if sum(trained) == 11 and model.training:
            signal.raise_signal(signal.SIGTERM)
        return last_token_loss(model, batch)

    stopped = toy_trainer(tmp_path / "b", steps=30, loss=interrupted).fit()
    assert stopped.stopped_by == "SIGTERM" and stopped.step == 11
    resumed = toy_trainer(tmp_path / "b", steps=30)
    assert resumed.resume() == runs.step_dir(tmp_path / "b", 11) and resumed.step == 11
    resumed.fit()
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert runs_metrics(tmp_path / "a") == runs_metrics(tmp_path / "b")  # every logged value, bit for bit


def runs_metrics(run_dir):
    """The run's metrics.jsonl records without the wall-clock measurements (and each process's goodput)."""
    strip = ("tokens_per_s", "memory_gib", "mfu")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in strip} for r in records if r.get("event") != "goodput"]


@pytest.mark.usefixtures("one_thread")
def test_state_dict_holds_everything_that_decides_the_next_step(tmp_path):
    one = toy_trainer(tmp_path / "one", steps=10)
    for _ in range(3):
        one.train_step()
    two = toy_trainer(tmp_path / "two", steps=10)
    saved = io.BytesIO()
    torch.save(one.state_dict(), saved)  # as a checkpoint holds it (state_dict() gives the live tensors)
    saved.seek(0)
    two.load_state_dict(torch.load(saved, weights_only=False))
    assert two.step == 3 and two.data.served == 3
    assert one.train_step() == two.train_step()  # same loss, grad norm, lr and accuracy, bit for bit
    for (name, a), (_, b) in zip(one.model.state_dict().items(), two.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_evaluate_weights_each_batch_by_the_units_its_loss_counts(tmp_path):
    trainer = toy_trainer(tmp_path / "r", steps=1)
    small, large = next(ToyStream(batch=2, seed=5)), next(ToyStream(batch=30, seed=6))
    trainer.eval_data = lambda: iter([small, large])
    trainer.model.eval()
    with torch.no_grad():
        means = [float(last_token_loss(trainer.model, b).loss) for b in (small, large)]
    assert trainer.evaluate()["val_loss"] == pytest.approx((2 * means[0] + 30 * means[1]) / 32, rel=1e-6)
    assert trainer.model.training  # back in training mode afterwards


def test_pretraining_runs_through_the_trainer(monkeypatch, tmp_path):
    from llamaherd.data.pack import pack_documents
    from llamaherd.data.stdlib_corpus import stdlib_documents
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.train import trainer as trainer_module
    from llamaherd.train.pretrain import pretrain

    calls = []
    real = trainer_module.Trainer.train_step

    def counted(self):
        calls.append(type(self.loss).__name__)
        return real(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", counted)
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    tok.save(tmp_path / "tok.model")
    pack_documents([d.text for d in stdlib_documents("train", max_bytes=30_000)], tok, tmp_path / "packed",
                   progress=False)
    cfg = load_config("tiny", ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
                               "train.steps=3", "train.batch_size=2", "train.seq_len=32", "train.eval_every=0",
                               f"data.train_dir={tmp_path / 'packed'}", f"tokenizer.path={tmp_path / 'tok.model'}"])
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.step == 3 and calls == ["NextTokenLoss"] * 3


@pytest.mark.parametrize("tie", [True, False])
def test_build_model_materialises_what_a_direct_build_gives(tie):
    """Built on the meta device, then materialised: the same weights, RoPE tables and tying as a model
    built directly on the CPU with the same seed."""
    cfg = load_config(None, ["train.seed=7"])
    args = tiny_model_args(tie_embeddings=tie)
    built = build_model(args, cfg, torch.device("cpu"))
    direct = Transformer(args)
    direct.init_weights(seed=7)
    assert built.training and not any(p.is_meta for p in built.parameters())
    for (name, a), (_, b) in zip(built.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(built.rope_cos, direct.rope_cos) and torch.equal(built.rope_sin, direct.rope_sin)
    assert (built.output.weight is built.tok_embeddings.weight) == tie

"""`herd plan`: Meta's 405B layout among the top three at about Meta's MFU, the JSON contract, the memory model
against a measured run, and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.train.plan import HARDWARE, Candidate, cost, parse_tokens, plan, run_memory, stage_layers

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("gpus, dp, meta_mfu", [(16384, 128, 0.41), (8192, 64, 0.43)])
def test_meta_s_405b_layout_is_among_the_top_three_at_about_its_mfu(gpus, dp, meta_mfu):
    # Table 4 of the Llama 3 paper: TP 8, PP 16 and DP 128 (64 on 8K GPUs), 8K sequences, 16M tokens a batch,
    # 400 (430) TFLOP/s per GPU, 41% (43%) BF16 MFU
    found = plan("llama3.1-405b", gpus, "h100-80gb", 8192, "16M", top=3)
    layouts = [(c.tp, c.pp, c.dp) for c in found]
    assert (8, 16, dp) in layouts, layouts
    meta = found[layouts.index((8, 16, dp))]
    assert meta.fits and meta.memory_gib <= 80
    assert abs(meta.mfu - meta_mfu) <= 0.10, meta.mfu
    assert not meta.activation_checkpointing  # Meta trained 8K sequences without it
    assert all(c.fits for c in found) and [c.step_s for c in found] == sorted(c.step_s for c in found)


def test_json_lists_objects_with_the_contract_fields(capsys):
    assert main(["plan", "--model", "llama3.1-405b", "--gpus", "16384", "--gpu", "h100-80gb", "--seq", "8192",
                 "--global-batch-tokens", "16M", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and 1 <= len(rows) <= 10
    for row in rows:
        assert {"tp", "pp", "dp", "memory_gib", "step_s", "mfu", "fits"} <= set(row)
        assert row["tp"] * row["pp"] * row["dp"] == 16384 and row["fits"] is True
        assert row["assumptions"]["matmul_efficiency"] > 0 and "h100-80gb" in row["assumptions"]["hardware"]


def test_the_table_states_its_assumptions(capsys):
    assert main(["plan", "--model", "llama3-8b", "--gpus", "64", "--gpu", "h200", "--global-batch-tokens", "4M"]) == 0
    out = capsys.readouterr().out
    assert "assumptions: h200 = 989 TFLOP/s bf16" in out and "matmul_efficiency" in out and "dp_overlap" in out


def test_layers_split_as_meta_split_405b():
    assert stage_layers(126, 16) == [7] + [8] * 14 + [7]
    assert sum(stage_layers(32, 4)) == 32 and stage_layers(5, 2) == [3, 2] and stage_layers(10, 1) == [10]


def test_the_memory_model_is_within_20_percent_of_a_measured_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from cpu_plan_memory import measure
    finally:
        sys.path.pop(0)
    result = measure(dim=512, layers=4, batch=8, seq=256)  # measured by PyTorch's memory tracker, in a child
    assert 0.8 <= result["ratio"] <= 1.2, result


def test_the_memory_model_follows_the_chunked_loss_and_bf16_weights():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from cpu_plan_memory import measure
    finally:
        sys.path.pop(0)
    # a 16K vocabulary, so that the logits weigh: train.loss_chunk keeps 256 of the 2,048 tokens' logits
    lean = measure(dim=512, layers=4, batch=8, seq=256, vocab=16384,
                   extra=["train.loss_chunk=256", "train.param_dtype=bfloat16"])
    assert 0.8 <= lean["ratio"] <= 1.2, lean
    assert lean["predicted"]["logits"] < 0.1 and lean["predicted"]["working_weights"] == 0


def test_bad_input_is_one_line(capsys):
    for argv, message in [
        (["--model", "llama9", "--gpus", "8"], "--model 'llama9': expected one of"),
        (["--model", "llama3-8b", "--gpus", "8", "--gpu", "tpu"], "--gpu 'tpu': expected one of h100-80gb"),
        (["--model", "llama3-8b", "--gpus", "8", "--global-batch-tokens", "lots"], "'lots': expected a token count"),
        (["--model", "llama3-8b", "--gpus", "8", "--seq", "3000", "--global-batch-tokens", "4M"],
         "not a whole number of 3,000-token sequences"),
        (["--model", "llama3-8b", "--gpus", "2", "--param-dtype", "bfloat16"], "bf16 states train in one process"),
        (["--model", "llama3-8b", "--gpus", "1", "--loss-chunk", "-1"], "--loss-chunk -1: expected 0"),
    ]:
        assert main(["plan", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert parse_tokens("16M") == 16 * 2**20 and parse_tokens("4096") == 4096
    with pytest.raises(HerdError):
        parse_tokens("")


def test_herd_plan_fits_llama3_8b_at_8192_tokens_on_one_gpu_only_with_the_lean_options(capsys):
    # the memory target as the planner sees it: float32 states (16 bytes a parameter) never fit 80 GB;
    # bf16 states, the chunked loss and activation checkpointing do, with checkpointing chosen
    one = dict(gpus=1, gpu="h100-80gb", seq=8192, global_batch_tokens=8192)
    assert plan("llama3-8b", **one) == []
    (bf16,) = plan("llama3-8b", **one, param_dtype="bfloat16")
    (lean,) = plan("llama3-8b", **one, param_dtype="bfloat16", loss_chunk=1024)
    assert lean.fits and lean.activation_checkpointing and lean.memory_gib < HARDWARE["h100-80gb"]["memory_gib"]
    assert lean.memory["logits"] < 1.5 < 7.0 < bf16.memory["logits"]  # no [8192, 128K] float32 logits + gradient
    assert lean.memory_gib < bf16.memory_gib - 6
    # the chunk applies where training allows it: not under tensor or pipeline parallelism
    wide = plan("llama3-8b", gpus=8, gpu="h100-80gb", seq=8192, global_batch_tokens="1M", loss_chunk=1024, top=0,
                only_fitting=False, all_variants=True)
    assert {c.memory["logits"] > 0 for c in wide if c.tp > 1 and c.pp == 1} == {True}
    assert main(["plan", "--model", "llama3-8b", "--gpus", "1", "--seq", "8192", "--global-batch-tokens", "8192",
                 "--param-dtype", "bfloat16", "--loss-chunk", "1024", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["assumptions"]["param_dtype"] == "bfloat16" and row["assumptions"]["loss_chunk"] == 1024


def test_plan_command_runs_as_a_program():
    proc = subprocess.run([sys.executable, "-m", "llamaherd", "plan", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--global-batch-tokens" in proc.stdout


def test_the_memory_model_orders_the_checkpointing_policies():
    from llamaherd.config import load_config
    from llamaherd.model.args import preset

    args = preset("llama3-8b")
    run = ["train.batch_size=1", "train.seq_len=8192", "train.grad_accum=1"]
    memory = {}
    for name, extra in [("none", []), ("full", ["train.activation_checkpointing=true"]),
                        ("op", ["train.activation_checkpointing=true", "train.ac_policy=op"]),
                        ("every 2", ["train.activation_checkpointing=true", "train.ac_policy=2"])]:
        memory[name] = run_memory(load_config("tiny", run + extra), args, precision="bf16")
    acts = {name: m["activations"] for name, m in memory.items()}
    assert acts["none"] > acts["op"] > acts["full"] and acts["none"] > acts["every 2"] > acts["full"], acts
    # only the activations differ, by the policies' elements per token per layer (bf16: 2 bytes each): none
    # 6h + 2kv + 3f, op 5h + 2kv + 2f, full h; and every checkpointing policy holds one layer in full besides
    assert all(m["model_states"] == memory["none"]["model_states"] for m in memory.values())
    h, kv, f = 4096, 1024, 14336
    gib = 8192 * 2 / 2**30  # per element per token
    one_layer = gib * (6 * h + 2 * kv + 3 * f)
    assert acts["none"] - acts["op"] == pytest.approx(32 * gib * (h + f) - one_layer, abs=0.02)
    assert acts["none"] - acts["full"] == pytest.approx(32 * gib * (5 * h + 2 * kv + 3 * f) - one_layer, abs=0.02)
    assert acts["every 2"] == pytest.approx((acts["none"] + acts["full"] + one_layer) / 2, abs=0.02)


def test_the_policies_recompute_what_they_checkpoint():
    from llamaherd.model.args import flops_per_token, preset

    args = preset("llama3-8b")
    hw = HARDWARE["h100-80gb"]
    times = {}
    for name, ac, policy in [("none", False, "full"), ("full", True, "full"), ("op", True, "op"), ("2", True, "2")]:
        c = cost(Candidate(1, 1, 8, 1, 1, "-", ac), args, hw, 8192, 8 * 8192, flops_per_token(args, 8192),
                 ac_policy=policy)
        times[name] = c.time["compute"]
    # "op" recomputes no matmul: the compute of no checkpointing; every 2nd layer: half the extra forward of full
    assert times["op"] == times["none"] < times["2"] < times["full"]
    assert times["2"] - times["none"] == pytest.approx((times["full"] - times["none"]) / 2, rel=1e-3)

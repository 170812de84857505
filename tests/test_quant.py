"""Weight-only int8 / int4 quantisation: the codes, the layers, whole models, `herd quantize`, `herd generate --quant`.

Tolerances, stated once:
- codes: every weight within half a quantisation step of its value (|w - dequantised| <= s / 2, times 1 + 1e-5
  for float rounding);
- a layer: its output equals x @ dequantised(W).T to 1e-5 of the output's largest magnitude in float32
  (1e-2 in bfloat16, the rounding of its inputs and output);
- the tiny model (dim 64, 2 layers, seeded random weights, float32, 4 x 32 tokens), logits against the
  float model's, max |diff| / std(float logits): int8 <= 0.08 (measured 0.034-0.041 over 4 seeds), int4 in
  groups of 32 <= 0.6 (measured 0.28-0.36); top-1 agreement int8 >= 0.95 (0.98-1.0), int4 >= 0.85 (0.92-0.95).
  Random weights give nearly flat logits (std 0.16), so near-ties make top-1 a harsh measure.
- a quantised checkpoint loads to exactly the model quantising in memory makes (torch.equal on logits);
- torchao 0.18's int4 (CPU, tinygemm form) gives bit-identical packed weights, scales and logits; its int8
  uses max |w| / 127.5 where we use / 127, so with our scales it gives the same codes, and logits within 1e-5.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from llamaherd.checkpoint import info, load, quantize_checkpoint, save
from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.generation import generate
from llamaherd.model.quant import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    has_kernel,
    pack_int4,
    quant_config,
    quantize,
    quantize_int4,
    quantize_int8,
    quantize_state_dict,
    quantized,
    unpack_int4,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 520  # make_tiny_model: dim 64, 2 layers, 8 heads of 8, 2 KV heads, SwiGLU hidden 192
BOUNDS = {"int8": (0.08, 0.95), "int4": (0.6, 0.85)}  # max |diff| / std, top-1 agreement (see above)
GROUP = {"int8": None, "int4": 32}


def weights(out: int = 40, width: int = 128, seed: int = 0) -> torch.Tensor:
    """Normal weights with the awkward rows a real matrix has: an outlier, all zeros, all far from zero."""
    w = torch.randn(out, width, generator=torch.Generator().manual_seed(seed)) * 0.02
    w[1, 5] = 0.9
    w[2] = 0.0
    w[3] += 0.5
    return w


def tokens(seed: int = 1, batch: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the codes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_codes_are_within_half_a_step_of_every_weight(dtype):
    w = weights()
    q, s = quantize_int8(w, dtype)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == dtype and s.shape == (w.shape[0],)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    torch.testing.assert_close(s, (w.abs().amax(dim=1) / 127).to(dtype).clamp(min=torch.finfo(dtype).tiny))
    err = (w - dequantize_int8(q, s)).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-5)).all()
    nonzero = w.abs().amax(dim=1) > 0
    assert (q.abs().amax(dim=1)[nonzero] == 127).all()  # each row uses the whole range
    assert (q[2] == 0).all() and (dequantize_int8(q, s)[2] == 0).all()  # an all-zero row stays exactly zero


def test_int4_packing_puts_the_even_column_in_the_high_bits_and_round_trips():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 8, 7]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x12, 0x34], [0xF0, 0x87]]
    codes = torch.randint(0, 16, (16, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_codes_are_within_half_a_step_of_every_weight(dtype):
    w = weights()
    packed, s, z = quantize_int4(w, 32, dtype)
    assert packed.dtype == torch.uint8 and packed.shape == (40, 64) and s.shape == z.shape == (40, 4)
    groups = w.view(40, 4, 32)
    tiny = torch.finfo(dtype).tiny
    torch.testing.assert_close(s, ((groups.amax(-1) - groups.amin(-1)) / 15).to(dtype).clamp(min=tiny))
    codes = unpack_int4(packed).view(40, 4, 32)
    assert (codes.amin(-1)[s.float() > 1e-30] == 0).all() and (codes.amax(-1)[s.float() > 1e-30] == 15).all()
    err = (groups - dequantize_int4(packed, s, z, 32).view(40, 4, 32)).abs()
    assert (err <= s.float()[..., None] / 2 * (1 + 1e-5)).all()
    assert (dequantize_int4(packed, s, z, 32)[2] == 0).all()  # a constant group is exact


# --- the layers ----------------------------------------------------------------------------------

def test_the_fused_kernels_are_used_on_this_cpu():
    """Otherwise the tests below would only check the dequantise-and-multiply fallback."""
    for dtype in (torch.float32, torch.bfloat16):
        assert has_kernel("int8", "cpu", dtype) and has_kernel("int4", "cpu", dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "fallback"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_linear_equals_the_product_with_the_dequantised_weight(scheme, kernel, dtype, tol):
    w = weights(out=40)  # 40 rows: int4's kernels take multiples of 16, so rows are padded and dropped again
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    if scheme == "int8":
        q, s = quantize_int8(w, dtype)
        layer, dq = Int8Linear(q, s, kernel=kernel), dequantize_int8(q, s)
        assert layer.kernel is kernel
    else:
        packed, s, z = quantize_int4(w, 32, dtype)
        layer, dq = Int4Linear(packed, s, z, 32, kernel=kernel), dequantize_int4(packed, s, z, 32)
        assert layer.layout == ("cpu" if kernel else "plain")
    y = layer(x)
    want = x.float() @ dq.t()
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=0, atol=tol * want.abs().max().item())


def test_int8_kernel_is_safe_on_misaligned_inputs_and_weights():
    """torch's CPU int8 kernel crashes the process on operands that do not start on a 64-byte boundary (a tensor
    memory-mapped from a checkpoint, a slice); Int8Linear copies them. Run in a child: a crash is a failure here."""
    code = """if True:
        import torch
        from llamaherd.model.quant import Int8Linear, quantize_int8, dequantize_int8
        q, s = quantize_int8(torch.randn(64, 64), torch.bfloat16)
        wbuf = torch.zeros(64 * 64 + 8, dtype=torch.int8)
        w = wbuf[8:].view(64, 64)
        w.copy_(q)
        xbuf = torch.randn(32 * 64 + 1).bfloat16()
        x = xbuf[1:].view(32, 64)
        y = Int8Linear(w, s)(x)
        want = x.float() @ dequantize_int8(q, s).t()
        assert (y.float() - want).abs().max() <= 1e-2 * want.abs().max(), "wrong product"
        print("ok")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --- whole models --------------------------------------------------------------------------------

def agreement(model, reference, toks) -> tuple[float, float]:
    """max |logits diff| / std of the reference logits, and the fraction of positions with the same top-1."""
    with torch.no_grad():
        got, want = model(toks).float(), reference(toks).float()
    return ((got - want).abs().max() / want.std()).item(), (got.argmax(-1) == want.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_tiny_model_logits_stay_close_to_the_float_ones(make_tiny_model, scheme):
    model = make_tiny_model()
    qmodel = quantize(copy.deepcopy(model), scheme, GROUP[scheme])
    assert quantized(qmodel) == quant_config(scheme, GROUP[scheme]) and quantized(model) is None
    kind = Int8Linear if scheme == "int8" else Int4Linear
    assert all(isinstance(qmodel.layers[i].get_submodule(n), kind) for i in range(2)
               for n in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"))
    assert isinstance(qmodel.output, Int8Linear) == (scheme == "int8")  # the head: int8 yes, int4 no
    assert torch.equal(qmodel.tok_embeddings.weight, model.tok_embeddings.weight)
    diff, top1 = agreement(qmodel, model, tokens())
    bound, min_top1 = BOUNDS[scheme]
    assert diff <= bound and top1 >= min_top1, (diff, top1)
    assert diff > 1e-4  # the weights really are quantised


def test_quantising_to_bfloat16_casts_the_rest_and_keeps_a_tied_head_tied(make_tiny_model):
    model = make_tiny_model(tie_embeddings=True)
    qmodel = quantize(copy.deepcopy(model), "int4", 32, dtype=torch.bfloat16)
    assert qmodel.output.weight is qmodel.tok_embeddings.weight  # int4 leaves the tied head as it is
    assert qmodel.tok_embeddings.weight.dtype == qmodel.norm.weight.dtype == torch.bfloat16
    assert qmodel.layers[0].attention.wq.scales_and_zeros.dtype == torch.bfloat16
    assert qmodel(tokens()).dtype == torch.bfloat16
    qmodel = quantize(copy.deepcopy(model), "int8")  # the head quantised: made from the embeddings
    assert isinstance(qmodel.output, Int8Linear)
    assert torch.equal(qmodel.output.weight, quantize_int8(model.tok_embeddings.weight)[0])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_greedy_generation_with_a_quantised_model(make_tiny_model, scheme):
    """Random weights give near-tied logits, so a free-running float and quantised continuation part at the first
    near-tie. Asserted: decoding the quantised model with its KV cache (one-row products) gives exactly the tokens
    of re-running it on the whole sequence (many-row products); and along the float model's greedy continuation,
    teacher-forced, the quantised model picks the float model's token at >= 90% (int8) / 80% (int4) of steps."""
    model = make_tiny_model(max_seq_len=64)
    qmodel = quantize(copy.deepcopy(model), scheme, GROUP[scheme])
    prompt = tokens(seed=3, batch=1, length=8)[0].tolist()
    new = generate(qmodel, [prompt], max_new_tokens=16)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            ids.append(int(qmodel(torch.tensor([ids]))[0, -1].argmax()))
    assert new == ids[len(prompt):]

    float_new = generate(model, [prompt], max_new_tokens=24)[0]
    seq = torch.tensor([prompt + float_new])
    with torch.no_grad():
        picks = qmodel(seq)[0, len(prompt) - 1 : -1].argmax(-1)
    same = (picks == torch.tensor(float_new)).float().mean().item()
    assert same >= (0.9 if scheme == "int8" else 0.8), same


def test_quantize_state_dict_is_what_the_modules_hold(make_tiny_model):
    model = make_tiny_model(tie_embeddings=True)
    state = {n: p.detach() for n, p in model.named_parameters()}  # tied: tok_embeddings.weight only
    plain = quantize_state_dict(state, quant_config("int8"), torch.bfloat16)
    qmodel = quantize(copy.deepcopy(model), "int8", dtype=torch.bfloat16)
    for name in ("layers.1.feed_forward.w2", "output"):
        assert torch.equal(plain[f"{name}.weight"], qmodel.get_submodule(name).weight)
        assert torch.equal(plain[f"{name}.scales"], qmodel.get_submodule(name).scales)
    assert torch.equal(plain["tok_embeddings.weight"], model.tok_embeddings.weight.bfloat16())
    assert state["layers.0.attention.wq.weight"].dtype == torch.float32  # the input is left as it was
    plain4 = quantize_state_dict(state, quant_config("int4", 32))
    assert set(plain4) - set(state) == {f"layers.{i}.{n}.{k}" for i in range(2) for n in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
        "feed_forward.w3") for k in ("scales", "zeros")}
    assert plain4["layers.0.feed_forward.w2.weight"].shape == (64, 96)  # [out, in / 2], hidden 192


# --- herd quantize, loading, herd generate --quant ----------------------------------------------

@pytest.fixture
def float_ckpt(tmp_path, make_tiny_model, small_tokenizer):
    model = make_tiny_model(seed=1, max_seq_len=256)
    return save(model, tmp_path / "float", layout="herd", tokenizer=small_tokenizer), model


@pytest.mark.parametrize("scheme,tied", [("int8", False), ("int8", True), ("int4", False)])
def test_herd_quantize_writes_a_checkpoint_that_loads_as_the_in_memory_model(
        tmp_path, make_tiny_model, small_tokenizer, capsys, scheme, tied):
    src = save(make_tiny_model(seed=2, tie_embeddings=tied), tmp_path / "float", tokenizer=small_tokenizer)
    out = tmp_path / "q"
    argv = ["quantize", str(src), "--out", str(out), "--quant", scheme]
    assert main(argv + (["--group-size", "32"] if scheme == "int4" else [])) == 0
    assert f"wrote {out}: {scheme} weight-only" in capsys.readouterr().out
    cfg = json.loads((out / "herd.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    assert cfg["quantization"] == {"scheme": scheme, "group_size": GROUP[scheme], "head": scheme == "int8"}
    assert (out / "tokenizer.model").is_file()
    assert info(out)["quantization"] == cfg["quantization"]

    loaded, tok = load(out)  # checksums verified
    assert tok.n_words == small_tokenizer.n_words
    in_memory = quantize(load(src)[0], scheme, GROUP[scheme], dtype=torch.bfloat16)
    assert quantized(loaded) == quantized(in_memory)
    toks = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(toks), in_memory(toks))
    float_bytes = (src / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < float_bytes * (0.5 if scheme == "int8" else 0.45)

    assert main(["info", str(out)]) == 0
    assert f"quantized   {quant_config(scheme, GROUP[scheme]).describe()}" in capsys.readouterr().out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_herd_generate_quant_on_cpu_and_the_quantised_checkpoint_print_the_same_text(float_ckpt, tmp_path, capsys,
                                                                                      small_tokenizer, scheme):
    src, model = float_ckpt
    group = ["--group-size", "32"] if scheme == "int4" else []
    greedy = ["--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "10", "--device", "cpu"]
    assert main(["generate", str(src), "--quant", scheme, *group, *greedy]) == 0
    text = capsys.readouterr().out
    qmodel = quantize(copy.deepcopy(model), scheme, GROUP[scheme], dtype=torch.bfloat16)  # --quant's default dtype
    want = generate(qmodel, [small_tokenizer.encode("the cat", bos=True)], max_new_tokens=10)[0]
    assert text == small_tokenizer.decode([t for t in want if t not in small_tokenizer.stop_tokens]) + "\n"

    out = quantize_checkpoint(src, tmp_path / "q", scheme, GROUP[scheme])
    assert main(["generate", str(out), *greedy]) == 0  # loads quantised without --quant
    assert capsys.readouterr().out == text
    assert main(["generate", str(out), "--quant", scheme, *greedy]) == 0  # the same --quant again: nothing to do
    assert capsys.readouterr().out == text


@pytest.mark.slow
def test_compiled_cpu_decoding_of_a_quantised_model_gives_the_same_tokens(make_tiny_model):
    """generate(compile=True) on a CPU exports the decode step and compiles it with AOTInductor: the int8 kernel and
    our int4 op must go through both (about 20 s)."""
    qmodel = quantize(make_tiny_model(max_seq_len=64), "int4", 32, dtype=torch.bfloat16)
    prompt = tokens(seed=4, batch=1, length=6)[0].tolist()
    assert generate(qmodel, [prompt], max_new_tokens=12, compile=True) == generate(qmodel, [prompt], max_new_tokens=12)


def test_bad_quantisation_requests_are_clear_errors(make_tiny_model, tmp_path):
    model = make_tiny_model()
    with pytest.raises(HerdError, match="unknown quantisation scheme 'int3'"):
        quantize(model, "int3")
    with pytest.raises(HerdError, match="int4 group size 48 is not supported"):
        quantize(model, "int4", 48)
    with pytest.raises(HerdError, match="int8 has one scale per output channel"):
        quantize(model, "int8", 64)
    with pytest.raises(HerdError, match="group size 128 does not divide the input width 64 of layers.0.attention.wq"):
        quantize(model, "int4", 128)
    assert quantized(model) is None  # a refused request leaves the model as it was
    quantize(model, "int8")
    with pytest.raises(HerdError, match=r"already quantised \(int8"):
        quantize(model, "int4", 32)
    with pytest.raises(HerdError, match="the model is quantised"):
        save(model, tmp_path / "x")


def one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_cli_input_is_a_one_line_error(float_ckpt, tmp_path, capsys):
    src, _ = float_ckpt
    out = str(tmp_path / "q")
    assert "nope: checkpoint directory not found" in one_line_error(
        capsys, ["quantize", str(tmp_path / "nope"), "--out", out, "--quant", "int8"])
    assert "does not divide the input width 64" in one_line_error(
        capsys, ["quantize", str(src), "--out", out, "--quant", "int4", "--group-size", "128"])
    assert "int8 has one scale per output channel" in one_line_error(
        capsys, ["quantize", str(src), "--out", out, "--quant", "int8", "--group-size", "64"])
    assert not (tmp_path / "q").exists()
    greedy = ["--prompt", "x", "--temperature", "0", "--max-new-tokens", "2", "--device", "cpu"]
    assert "--group-size 32 applies to --quant int4 only" in one_line_error(
        capsys, ["generate", str(src), "--group-size", "32", *greedy])
    assert "does not divide the input width 64" in one_line_error(
        capsys, ["generate", str(src), "--quant", "int4", "--group-size", "128", *greedy])

    q4 = quantize_checkpoint(src, tmp_path / "q4", "int4", 32)
    assert "is already quantised (int4" in one_line_error(capsys, ["generate", str(q4), "--quant", "int8", *greedy])
    assert "is already quantised (int4" in one_line_error(
        capsys, ["quantize", str(q4), "--out", str(tmp_path / "again"), "--quant", "int8"])
    cfg = json.loads((q4 / "herd.json").read_text())
    cfg["quantization"]["scheme"] = "int2"
    (q4 / "herd.json").write_text(json.dumps(cfg))
    err = one_line_error(capsys, ["info", str(q4)])
    assert "herd.json" in err and "unknown quantisation scheme 'int2'" in err

    with pytest.raises(SystemExit) as e:  # argparse: the usage line, then the choices
        main(["quantize", str(src), "--out", out, "--quant", "int3"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err


# --- torchao, the reference ----------------------------------------------------------------------

BLOCK = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
         "feed_forward.w3")


def test_int4_is_bit_identical_to_torchao(make_tiny_model):
    pytest.importorskip("torchao")
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    model = make_tiny_model()
    theirs = copy.deepcopy(model)
    quantize_(theirs, PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("layers."))
    ours = quantize(copy.deepcopy(model), "int4", 32)
    for i in range(2):
        for name in BLOCK:
            w, mine = theirs.layers[i].get_submodule(name).weight, ours.layers[i].get_submodule(name)
            assert torch.equal(w.qdata, mine.weight) and torch.equal(w.scale_and_zero, mine.scales_and_zeros)
    toks = tokens()
    with torch.no_grad():
        assert torch.equal(ours(toks), theirs(toks))


def test_int8_matches_torchao(make_tiny_model):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    model = make_tiny_model()
    ours = quantize(copy.deepcopy(model), "int8")
    theirs = copy.deepcopy(model)  # torchao's int8 tensors, made with our scales: the same codes
    for name, m in list(theirs.named_modules()):
        if isinstance(m, torch.nn.Linear):
            mine = ours.get_submodule(name)
            t = Int8Tensor.from_hp(m.weight.detach(), PerRow(), scale=mine.scales[:, None])
            assert torch.equal(t.qdata, mine.weight)
            m.weight = torch.nn.Parameter(t, requires_grad=False)
    toks = tokens()
    with torch.no_grad():
        got, want = ours(toks), theirs(toks)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())

    default = copy.deepcopy(model)  # torchao's own scales (max |w| / 127.5): as close to the float model as ours
    quantize_(default, Int8WeightOnlyConfig(set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    assert agreement(default, model, toks)[0] <= BOUNDS["int8"][0]
    assert agreement(ours, default, toks)[0] <= BOUNDS["int8"][0]

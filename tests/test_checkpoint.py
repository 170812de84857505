"""Checkpoints: Meta's model-parallel shards, bit-exact round trips between the three layouts,
detection, checksums, atomic writes, memory-mapped loading, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llamaherd.checkpoint import LAYOUTS, convert, detect, hf, info, load, meta, native, save
from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.model.args import preset

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def file_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pth":
        return torch.load(path, map_location="cpu", weights_only=True)
    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


# Meta's reference model (llama_models/llama3/model.py) builds these with fairscale:
# ColumnParallelLinear splits its output features (dim 0), RowParallelLinear its input features
# (dim 1), VocabParallelEmbedding the vocabulary (dim 0); RMSNorm weights are replicated.
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")
ROW_PARALLEL = ("wo", "w2")


def split_like_meta(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    shards = [{} for _ in range(n)]
    for name, t in state.items():
        module = name.split(".")[-2]
        dim = 0 if module in COLUMN_PARALLEL else 1 if module in ROW_PARALLEL else None
        for rank in range(n):
            shards[rank][name] = (t.chunk(n, dim)[rank] if dim is not None else t).clone()
    return shards


def test_two_shard_meta_checkpoint_merges_to_the_same_weights(tmp_path, make_tiny_model):
    model = make_tiny_model()
    ckpt = tmp_path / "meta-mp2"
    ckpt.mkdir()
    for rank, shard in enumerate(split_like_meta(model.state_dict(), 2)):
        torch.save(shard, ckpt / f"consolidated.{rank:02d}.pth")
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size,
                  multiple_of=a.multiple_of, ffn_dim_multiplier=None, norm_eps=1e-5, rope_theta=500000.0,
                  use_scaled_rope=False)
    (ckpt / "params.json").write_text(json.dumps(params))

    loaded, tokenizer = load(ckpt)
    assert tokenizer is None
    assert_same_weights(loaded, model)
    assert loaded.args == model.args.replace(max_seq_len=8192)  # params.json has no max_seq_len

    save(model, tmp_path / "ours-mp2", layout="meta", shards=2)  # and our writer splits the same way
    for rank in range(2):
        ours, theirs = (file_tensors(d / f"consolidated.{rank:02d}.pth") for d in (tmp_path / "ours-mp2", ckpt))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("dtype,tied", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-tied"])
def test_meta_hf_herd_meta_round_trip_is_bit_exact(tmp_path, make_tiny_model, small_tokenizer, dtype, tied):
    model = make_tiny_model(multiple_of=256, tie_embeddings=tied, use_scaled_rope=True).to(dtype)
    save(model, tmp_path / "meta", layout="meta", tokenizer=small_tokenizer)
    convert(tmp_path / "meta", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "herd", to="herd")
    convert(tmp_path / "herd", tmp_path / "meta2", to="meta")

    for name in ("meta", "hf", "herd", "meta2"):
        loaded, tok = load(tmp_path / name)
        assert_same_weights(loaded, model)
        assert tok.mergeable_ranks == small_tokenizer.mergeable_ranks, name
    assert load(tmp_path / "herd")[0].args == load(tmp_path / "meta")[0].args

    # the files themselves: Meta's are identical, herd's hold Meta's names, Hugging Face's the permuted q/k
    state = model.state_dict()
    first, last = (file_tensors(tmp_path / d / "consolidated.00.pth") for d in ("meta", "meta2"))
    assert first.keys() == last.keys() == state.keys()
    assert all(last[k].dtype == dtype and torch.equal(first[k], last[k]) and torch.equal(last[k], state[k])
               for k in state)
    assert (tmp_path / "meta" / "params.json").read_bytes() == (tmp_path / "meta2" / "params.json").read_bytes()
    herd = file_tensors(tmp_path / "herd" / "model.safetensors")
    assert herd.keys() == {k for k in state if not (tied and k == "output.weight")}
    assert all(herd[k].dtype == dtype and torch.equal(herd[k], state[k]) for k in herd)
    hf_files = file_tensors(tmp_path / "hf" / "model.safetensors")
    assert len(hf_files) == len(herd)
    for k in herd:
        heads = {"wq": model.args.n_heads, "wk": model.args.n_kv_heads}.get(k.split(".")[-2])
        want = hf.to_hf_rope(state[k], heads) if heads else state[k]
        assert hf_files[hf.file_name(k)].dtype == dtype and torch.equal(hf_files[hf.file_name(k)], want), k


def test_hf_rope_permutation_is_the_half_split_of_each_head():
    # Meta's rows per head: pairs (0,1), (2,3), ...; Hugging Face's: first halves, then second halves
    w = torch.arange(2 * 8).float()[:, None]  # 2 heads of dim 8, one column holding the row index
    assert hf.to_hf_rope(w, 2).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert torch.equal(hf.from_hf_rope(hf.to_hf_rope(w, 2), 2), w)


def test_detect_each_layout_and_load_without_tokenizer(tmp_path, make_tiny_model):
    model = make_tiny_model()
    for layout in LAYOUTS:
        save(model, tmp_path / layout, layout=layout)
        assert detect(tmp_path / layout) == layout
        loaded, tokenizer = load(tmp_path / layout)
        assert tokenizer is None and not loaded.training
    (tmp_path / "empty").mkdir()
    with pytest.raises(HerdError, match="unknown checkpoint layout") as e:
        detect(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    assert all(f in str(e.value) for f in ("params.json", "config.json", "herd.json", "consolidated.00.pth"))
    with pytest.raises(HerdError, match="not found"):
        detect(tmp_path / "nowhere")


def test_hf_weights_sharded_by_size_load_back(tmp_path, make_tiny_model):
    model = make_tiny_model()
    save(model, tmp_path / "hf", layout="hf", max_shard_size=60_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    assert_same_weights(load(tmp_path / "hf")[0], model)
    (tmp_path / "hf" / files[1]).unlink()
    with pytest.raises(HerdError, match=files[1]):
        load(tmp_path / "hf")


def test_herd_checksums_catch_a_truncated_or_corrupt_file(tmp_path, make_tiny_model, small_tokenizer):
    save(make_tiny_model(), tmp_path / "ck", tokenizer=small_tokenizer)
    listed = json.loads((tmp_path / "ck" / "checksums.json").read_text())
    assert sorted(listed) == ["herd.json", "model.safetensors", "tokenizer.model"]
    weights = tmp_path / "ck" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1000])
    with pytest.raises(HerdError, match=r"model\.safetensors: \d+ bytes but checksums.json says"):
        load(tmp_path / "ck")
    weights.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])  # one bit flipped
    with pytest.raises(HerdError, match=r"model\.safetensors: sha256 does not match"):
        load(tmp_path / "ck")
    weights.write_bytes(data)
    (tmp_path / "ck" / "checksums.json").unlink()  # required in the herd layout
    with pytest.raises(HerdError, match=r"checksums\.json: file not found"):
        load(tmp_path / "ck")


@pytest.mark.parametrize("layout,file", [("hf", "config.json"), ("meta", "consolidated.00.pth")])
def test_checksums_written_with_every_layout_are_verified(tmp_path, make_tiny_model, layout, file):
    save(make_tiny_model(), tmp_path / "ck", layout=layout)
    target = tmp_path / "ck" / file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(HerdError, match=rf"{file}: sha256 does not match"):
        load(tmp_path / "ck")


def test_save_is_atomic_and_never_overwrites_by_accident(tmp_path, make_tiny_model, monkeypatch):
    first, second = make_tiny_model(seed=1), make_tiny_model(seed=2)
    dst = tmp_path / "ck"
    save(first, dst)
    with pytest.raises(HerdError, match="not empty"):
        save(second, dst)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(native, "write_checksums", disk_full)
    with pytest.raises(OSError, match="No space"):
        save(second, dst, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind
    assert_same_weights(load(dst)[0], first)  # and the old checkpoint is intact
    monkeypatch.undo()
    save(second, dst, overwrite=True)
    assert_same_weights(load(dst)[0], second)
    assert sorted(os.listdir(tmp_path)) == ["ck"]

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(HerdError, match="not a checkpoint"):
        save(first, notes, overwrite=True)


REAL_LLAMA32_1B_CONFIG = {  # config.json of meta-llama/Llama-3.2-1B-Instruct, less transformers_version
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
REAL_PARAMS = {  # params.json of Meta's Llama3.2-1B-Instruct, 3B-Instruct and Llama3.1-8B
    "llama3.2-1b": {"dim": 2048, "ffn_dim_multiplier": 1.5, "multiple_of": 256, "n_heads": 32, "n_kv_heads": 8,
                    "n_layers": 16, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                    "vocab_size": 128256},
    "llama3.2-3b": {"dim": 3072, "ffn_dim_multiplier": 1.0, "multiple_of": 256, "n_heads": 24, "n_kv_heads": 8,
                    "n_layers": 28, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                    "vocab_size": 128256},
    "llama3.1-8b": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                    "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                    "vocab_size": 128256},
}


@pytest.mark.parametrize("name", REAL_PARAMS)
def test_meta_params_json_reads_as_the_preset(tmp_path, name):
    (tmp_path / "params.json").write_text(json.dumps(REAL_PARAMS[name]))
    args = meta.read_args(tmp_path)
    assert args == preset(name)  # tied and RoPE factor 32 for the 3.2 shapes, factor 8 otherwise
    assert meta.params_dict(args) == {**REAL_PARAMS[name], "rope_scaling_factor": args.rope_scaling_factor}


def test_hf_config_json_is_the_real_one(tmp_path):
    args = preset("llama3.2-1b")
    assert hf.config_dict(args, torch.bfloat16) == REAL_LLAMA32_1B_CONFIG
    (tmp_path / "config.json").write_text(json.dumps(REAL_LLAMA32_1B_CONFIG))
    assert hf.read_args(tmp_path) == args
    # transformers 5 writes rope_parameters (with rope_theta inside) instead of rope_scaling
    v5 = {k: v for k, v in REAL_LLAMA32_1B_CONFIG.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**REAL_LLAMA32_1B_CONFIG["rope_scaling"], "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(v5))
    assert hf.read_args(tmp_path) == args


def test_tied_meta_checkpoint_with_a_different_output_head_is_refused(tmp_path, make_tiny_model):
    save(make_tiny_model(tie_embeddings=True), tmp_path / "ck", layout="meta")
    (tmp_path / "ck" / "checksums.json").unlink()
    file = tmp_path / "ck" / "consolidated.00.pth"
    state = file_tensors(file)
    state["output.weight"] = state["output.weight"].clone() + 1
    torch.save(state, file)
    with pytest.raises(HerdError, match="output.weight differs from tok_embeddings.weight"):
        load(tmp_path / "ck")


# --- bad input through the command line: exit code 2 and one line "error: ..." naming the file ----

def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _edit_json(file: Path, **changes) -> None:
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _bad(case: str, tmp: Path, model, tokenizer) -> tuple[Path, list[str]]:
    """A broken checkpoint and the strings its error must contain."""
    ck = tmp / case
    if case == "missing-dir":
        return ck, [str(ck), "not found"]
    layout = "hf" if case in ("no-config", "truncated-safetensors", "impossible-config") else "meta"
    save(model, ck, layout=layout)
    (ck / "checksums.json").unlink()  # as in checkpoints from elsewhere, so the readers meet the damage
    if case == "no-params":
        (ck / "params.json").unlink()
        return ck, [str(ck), "unknown checkpoint layout"]
    if case == "no-config":
        (ck / "config.json").unlink()
        return ck, [str(ck), "unknown checkpoint layout"]
    if case == "truncated-pth":
        _truncate(ck / "consolidated.00.pth")
        return ck, [str(ck / "consolidated.00.pth")]
    if case == "truncated-safetensors":
        _truncate(ck / "model.safetensors")
        return ck, [str(ck / "model.safetensors")]
    if case == "wrong-shape":
        state = file_tensors(ck / "consolidated.00.pth")
        state["layers.1.attention.wk.weight"] = torch.zeros(8, 64)
        torch.save(state, ck / "consolidated.00.pth")
        return ck, [str(ck / "consolidated.00.pth"), "layers.1.attention.wk.weight", "[8, 64]", "[16, 64]"]
    if case == "missing-tensor":
        state = file_tensors(ck / "consolidated.00.pth")
        del state["layers.0.ffn_norm.weight"]
        torch.save(state, ck / "consolidated.00.pth")
        return ck, [str(ck / "consolidated.00.pth"), "layers.0.ffn_norm.weight", "missing"]
    if case == "impossible-params":
        _edit_json(ck / "params.json", n_heads=7)
        return ck, [str(ck / "params.json"), "divisible by n_heads 7"]
    if case == "impossible-config":
        _edit_json(ck / "config.json", num_attention_heads=7)
        return ck, [str(ck / "config.json"), "not divisible by num_attention_heads 7"]
    if case == "tokenizer-too-big":
        tokenizer.save(ck / "tokenizer.model")  # 520 tokens for a model of 512
        return ck, [str(ck / "tokenizer.model"), "has 520 tokens but model vocab_size is 512"]
    raise AssertionError(case)


BAD_CASES = ["missing-dir", "no-params", "no-config", "truncated-pth", "truncated-safetensors", "wrong-shape",
             "missing-tensor", "impossible-params", "impossible-config", "tokenizer-too-big"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_checkpoints_give_one_line_cli_errors(tmp_path, make_tiny_model, small_tokenizer, capsys, case):
    src, expected = _bad(case, tmp_path, make_tiny_model(vocab_size=512), small_tokenizer)
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "herd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(s in err for s in expected), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half written


def test_herd_command_reports_errors_without_a_traceback(tmp_path, make_tiny_model):
    save(make_tiny_model(), tmp_path / "ck", layout="meta")
    _truncate(tmp_path / "ck" / "consolidated.00.pth")
    run = subprocess.run([sys.executable, "-m", "llamaherd.cli", "convert", str(tmp_path / "ck"),
                          str(tmp_path / "out"), "--to", "hf"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "consolidated.00.pth" in run.stderr and "Traceback" not in run.stderr


def test_info_and_convert_commands(tmp_path, make_tiny_model, small_tokenizer, capsys):
    model = make_tiny_model()
    save(model, tmp_path / "herd", tokenizer=small_tokenizer)
    assert main(["convert", str(tmp_path / "herd"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    assert main(["info", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    for line in ("layout      hf", f"parameters  {sum(p.numel() for p in model.parameters()):,}",
                 "dtype       bfloat16", "tokenizer   520 tokens", "n_kv_heads              2"):
        assert line in out, out
    assert info(tmp_path / "hf")["tokenizer_vocab"] == 520
    assert_same_weights(load(tmp_path / "hf", dtype=torch.float32)[0], model.to(torch.bfloat16).float())
    for command in ("convert", "info"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0


# --- memory: loading maps the files instead of copying them -------------------------------------

def _mapped_files() -> list[tuple[int, int, str]]:
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi, parts[5]))
    return spans


@pytest.mark.skipif(not Path("/proc/self/maps").exists(),
                    reason="finds the memory-mapped files through Linux's /proc/self/maps, which this OS lacks")
@pytest.mark.parametrize("layout", ["herd", "meta"])
def test_loaded_weights_are_views_of_the_mapped_files(tmp_path, make_tiny_model, layout):
    save(make_tiny_model(), tmp_path / "ck", layout=layout)
    model, _ = load(tmp_path / "ck")
    spans = _mapped_files()
    for name, p in model.named_parameters():
        ptr = p.data_ptr()
        assert any(lo <= ptr < hi and path.startswith(str(tmp_path / "ck")) for lo, hi, path in spans), name


MEASURE_PEAK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from llamaherd.checkpoint import hf, load
    from llamaherd.model.transformer import Transformer

    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

    # warm up: the first use of torch's code pages its libraries in, which counts as resident memory
    with torch.device("meta"):
        Transformer(hf.read_args(Path(sys.argv[1]))).init_rope("cpu")
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    base = status("VmRSS:")
    model, _ = load(sys.argv[1], tokenizer=False)
    print(status("VmHWM:") - base)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="resets the peak-memory counter through Linux's /proc/self/clear_refs, which this OS lacks")
def test_loading_a_46mb_checkpoint_adds_far_less_than_its_size(tmp_path):
    """Peak resident memory added by ``load``: a loader that copied the weights would add at least the
    checkpoint's size; ours maps the files and copies only the permuted q and k (a few MB)."""
    from llamaherd.model.transformer import Transformer

    args = preset("tiny", vocab_size=16384, tie_embeddings=False)  # 46 MB of float32
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu").init_weights(seed=0)
    save(model, tmp_path / "hf", layout="hf")  # Hugging Face's: q and k are permuted, so copied, on load
    size = (tmp_path / "hf" / "model.safetensors").stat().st_size
    del model
    run = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(tmp_path / "hf")], capture_output=True,
                         text=True, timeout=120)
    if run.returncode and "clear_refs" in run.stderr:
        pytest.skip("this kernel refuses writes to /proc/self/clear_refs, so the peak RSS cannot be reset for "
                    "the measurement")
    assert run.returncode == 0, run.stderr
    added = int(run.stdout.split()[-1])
    assert 40e6 < size < 60e6 and added < 0.5 * size, (added, size)

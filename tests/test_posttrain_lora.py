"""LoRA: parameter counts, merging, and parity with PEFT on the Hugging Face export.

Logits are compared in float32: our merged model against our LoRA model with atol 1e-5, anything
run by transformers or peft against ours with atol 1e-4 (rtol 0 throughout).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import llamaherd
from llamaherd.errors import HerdError
from llamaherd.posttrain.lora import (
    TARGETS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_parameter_count,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 520  # make_tiny_model: dim 64, 2 layers, 8 heads of 8, 2 KV heads, SwiGLU hidden 192
ATTN = LoRAConfig(rank=4, alpha=8.0)
ALL = LoRAConfig(rank=3, alpha=6.0, targets=TARGETS)


def batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Non-zero lora_B (and fresh lora_A), so that the adapter really changes the output."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.weight.normal_(0.0, std, generator=gen)
            m.lora_B.weight.normal_(0.0, std, generator=gen)


# per layer r * (in + out): wq 64+64, wk 64+16, wv 64+16, wo 64+64 (= 416); w1, w3 64+192, w2 192+64 (= 768)
@pytest.mark.parametrize("cfg,expected", [(ATTN, 2 * 4 * 416), (ALL, 2 * 3 * (416 + 768))], ids=["attention", "all"])
def test_trainable_parameters_match_the_formula(make_tiny_model, cfg, expected):
    model = apply_lora(make_tiny_model(), cfg)
    assert trainable_parameters(model) == lora_parameter_count(model.args, cfg) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert len(trainable) == 2 * model.args.n_layers * len(cfg.targets)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)  # every base weight is frozen


def test_fresh_adapter_changes_nothing_and_merging_keeps_the_logits(make_tiny_model):
    model, ids = make_tiny_model(), batch()
    with torch.no_grad():
        base = model(ids)
        apply_lora(model, ALL)
        torch.testing.assert_close(model(ids), base, rtol=0, atol=0)  # lora_B starts at zero
        randomize_adapters(model)
        lora = model(ids)
        assert (lora - base).abs().max() > 1e-2  # the adapter does change the model
        merge_lora(model)
        merged = model(ids)
    torch.testing.assert_close(merged, lora, rtol=0, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(getattr(layer.attention, t)) is nn.Linear for layer in model.layers for t in ("wq", "wo"))
    assert set(model.state_dict()) == set(make_tiny_model().state_dict())  # an ordinary Transformer again


def test_merged_export_and_peft_adapter_give_our_logits_in_transformers(tmp_path, make_tiny_model):
    model, ids = make_tiny_model(), batch()
    llamaherd.save(model, tmp_path / "base", layout="hf")  # the unmerged base model
    apply_lora(model, ALL)
    randomize_adapters(model, seed=3)
    with torch.no_grad():
        ours = model(ids)

    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 3, 6)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        base_logits = hf_base.eval()(ids).logits
    assert (base_logits - ours).abs().max() > 1e-2  # so an adapter PEFT failed to load would show
    with_adapter = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    assert len(peft.get_peft_model_state_dict(with_adapter)) == 2 * 2 * len(TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, ours, rtol=0, atol=1e-4)

    merge_lora(model)
    llamaherd.save(model, tmp_path / "merged", layout="hf")
    hf, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), loading
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours, rtol=0, atol=1e-4)


def test_backward_reaches_only_the_adapters(make_tiny_model):
    model = apply_lora(make_tiny_model(), LoRAConfig(rank=2, dropout=0.1, targets=TARGETS)).train()
    randomize_adapters(model)  # with lora_B zero, lora_A's gradient would be zero too
    ids = batch()
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name


def test_lora_state_dict_round_trip(make_tiny_model):
    src = apply_lora(make_tiny_model(), ATTN)
    randomize_adapters(src, seed=5)
    dst = apply_lora(make_tiny_model(), ATTN)
    load_lora_state_dict(dst, lora_state_dict(src))
    with torch.no_grad():
        torch.testing.assert_close(dst(batch()), src(batch()), rtol=0, atol=0)
    sd = lora_state_dict(src)
    sd["layers.0.attention.wq.lora_C.weight"] = sd.pop("layers.0.attention.wq.lora_A.weight")
    with pytest.raises(HerdError, match="lora_A"):
        load_lora_state_dict(dst, sd)


@pytest.mark.parametrize("kwargs,field", [
    (dict(rank=0), "rank"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(targets=()), "targets"),
    (dict(targets=("wq", "q_proj")), "'q_proj'.*w1"),  # names the bad one and lists the valid ones
])
def test_bad_config_is_a_one_line_error_naming_the_field(kwargs, field):
    with pytest.raises(HerdError, match=field) as err:
        LoRAConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_applying_twice_is_an_error(make_tiny_model):
    model = apply_lora(make_tiny_model(), ATTN)
    with pytest.raises(HerdError, match="already"):
        apply_lora(model, ALL)

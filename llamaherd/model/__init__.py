"""The Llama 3 model: hyper-parameters and presets, the transformer, attention masks."""

from llamaherd.model.args import PRESETS, ModelArgs, flops_per_token, num_params, preset
from llamaherd.model.transformer import KVCache, Transformer

__all__ = ["PRESETS", "KVCache", "ModelArgs", "Transformer", "flops_per_token", "num_params", "preset"]

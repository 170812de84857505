"""Model hyper-parameters, the Llama 3 presets, and parameter / FLOP counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llamaherd.errors import HerdError


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128_256
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    # Llama 3.1 RoPE frequency scaling ("use_scaled_rope" in Meta's params.json)
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    max_seq_len: int = 8192  # longest sequence the model is used with (RoPE table, KV cache)
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        checks = [
            (self.dim > 0 and self.n_layers > 0 and self.n_heads > 0, "dim, n_layers and n_heads must be positive"),
            (self.dim % self.n_heads == 0, f"dim {self.dim} must be divisible by n_heads {self.n_heads}"),
            (self.n_heads % self.n_kv_heads == 0,
             f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}"),
            ((self.dim // self.n_heads) % 2 == 0, f"head dim {self.dim // self.n_heads} must be even for RoPE"),
            (self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HerdError(f"model args: {msg}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size, computed as in Meta's reference FeedForward."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HerdError(f"model args: unknown field(s) {', '.join(unknown)}; "
                            f"expected some of {', '.join(sorted(names))}")
        return cls(**d)


_LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
_LLAMA3_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3)
_SCALED = dict(use_scaled_rope=True, max_seq_len=131_072)

PRESETS: dict[str, dict] = {
    # Llama 3.0: 8K context, no RoPE scaling
    "llama3-8b": dict(_LLAMA3_8B),
    "llama3-70b": dict(_LLAMA3_70B),
    # Llama 3.1: 128K context, RoPE scaling factor 8
    "llama3.1-8b": dict(_LLAMA3_8B, **_SCALED),
    "llama3.1-70b": dict(_LLAMA3_70B, **_SCALED),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                          ffn_dim_multiplier=1.2, **_SCALED),
    # Llama 3.2 text models: tied embeddings, RoPE scaling factor 32
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                        tie_embeddings=True, rope_scaling_factor=32.0, **_SCALED),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
                        tie_embeddings=True, rope_scaling_factor=32.0, **_SCALED),
    # Small shapes for a laptop CPU (vocabulary set by the tokenizer they are trained with)
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, multiple_of=64, vocab_size=8192, max_seq_len=512,
                 tie_embeddings=True),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, multiple_of=128, vocab_size=16384, max_seq_len=1024),
}


def preset(name: str, **overrides) -> ModelArgs:
    """The named preset's ``ModelArgs`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise HerdError(f"model preset {name!r} is unknown; expected one of {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})


def num_params(args: ModelArgs, *, embeddings: bool = True) -> int:
    """Parameter count (tied embeddings counted once)."""
    kv_dim = args.n_kv_heads * args.head_dim
    attn = args.dim * args.dim * 2 + args.dim * kv_dim * 2
    ffn = 3 * args.dim * args.hidden_dim
    per_layer = attn + ffn + 2 * args.dim
    emb = args.vocab_size * args.dim
    total = args.n_layers * per_layer + args.dim + emb  # + final norm + output head
    if embeddings and not args.tie_embeddings:
        total += emb
    if not embeddings:
        total -= emb
    return total


def flops_per_token(args: ModelArgs, seq_len: int, *, causal_half: bool = False) -> float:
    """Training FLOPs per token: 6N for the weight matmuls plus the attention score/value matmuls.

    N counts every matmul weight (the output head included, the embedding lookup excluded), as in
    the PaLM paper's appendix B. Attention adds 12 * n_layers * dim * seq_len (forward QK^T and AV,
    times 3 for forward + backward). By default the full attention matrix is counted, as nanoGPT's
    estimate_mfu and torchtitan do, so MFU figures compare with theirs; ``causal_half`` counts only
    the causal half that is really computed.
    """
    n_matmul = num_params(args, embeddings=False) - (2 * args.n_layers + 1) * args.dim + args.vocab_size * args.dim
    attn = 12 * args.n_layers * args.dim * seq_len
    if causal_half:
        attn /= 2
    return 6 * n_matmul + attn

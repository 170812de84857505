"""Recipes: TOML files read into dataclasses, with `section.key=value` overrides from the command line.

The dataclasses below are the one source of truth for defaults; a recipe overrides some of them,
and the command line overrides the recipe. Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from llamaherd.errors import HerdError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # the built-in recipes, shipped as package data


@dataclass
class ModelConfig:
    preset: str = "tiny"  # a name from llamaherd.model.PRESETS
    overrides: dict = field(default_factory=dict)  # any ModelArgs field, e.g. {"n_layers": 2}


@dataclass
class DataConfig:
    inputs: list = field(default_factory=lambda: ["stdlib:train"])  # raw text for `herd run`
    val_inputs: list = field(default_factory=lambda: ["stdlib:val"])
    text_field: str = "text"  # the text field of .jsonl / .parquet inputs
    max_bytes: int = 0  # cap on raw training text read (0: no cap)
    min_chars: int = 32  # basic cleaning: shorter documents are dropped
    max_chars: int = 1_000_000  # and longer ones
    train_dir: str = ""  # packed tokens for `herd pretrain` (`herd run` fills these in)
    val_dir: str = ""


@dataclass
class CurateConfig:
    # the curation pipeline `herd run` puts the corpus through before the tokenizer: stage tables as in a
    # `herd data curate` recipe ([{name = "exact_dedup"}, ...], in order); [] keeps what the length limits keep
    stages: list = field(default_factory=list)
    workers: int = 0  # worker processes (0: one per core)
    shard_docs: int = 128  # documents per unit of work


@dataclass
class TokenizerConfig:
    path: str = ""  # an existing tokenizer.model, "meta" for Meta's 128K file, or "" to train one
    vocab_size: int = 8192  # BPE ranks to train (256 special tokens come on top)


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8  # rows per micro-batch
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: bf16 autocast on GPU, float32 on CPU; or float32 / bfloat16
    compile: bool = False
    # tokens per chunk of a chunked head + cross-entropy (no [tokens, vocab] logits in memory; the same loss),
    # e.g. 1024: each chunk then holds 1024 x vocab logits (0.8 GB in bf16 + float32 at 128K); 0: the plain loss
    loss_chunk: int = 0
    activation_checkpointing: bool = False
    # with activation_checkpointing: "full" (each block recomputed whole), "op" (the matmuls' and attention's
    # outputs kept, the cheap operations recomputed) or "N" (every N-th block fully checkpointed, the rest not)
    ac_policy: str = "full"
    # the transformer blocks' linear layers in float8 (torchao, dynamic tensorwise scaling; needs torchao and tp=1)
    float8: bool = False
    # the dtype the weights, their gradients and AdamW's states are kept in: float32, or bfloat16 (memory-lean:
    # 8 bytes a parameter instead of 16, without float32 master weights; one process, no FSDP)
    param_dtype: str = "float32"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    tensorboard: bool = False


@dataclass
class ParallelConfig:
    # the device mesh [pp, dp_replicate, dp_shard, tp]; the product is the world size (torchrun's processes)
    dp_shard: int = -1  # FSDP: parameters, gradients and optimizer state sharded over this many ranks (-1: the rest)
    dp_replicate: int = 1  # HSDP: this many full replicas of the sharded model, gradients all-reduced between them
    tp: int = 1  # tensor parallel: each block's matrices split over this many ranks (at most the KV heads)
    pp: int = 1  # pipeline parallel: the layers cut into this many stages
    pp_schedule: str = "1F1B"  # 1F1B, Interleaved1F1B or GPipe
    microbatches: int = 0  # pipeline microbatches per step (0: as many as pipeline stages)
    loss_parallel: bool = True  # with tp: the cross-entropy computed on vocabulary shards, never gathering logits


@dataclass
class RecoveryConfig:
    # what the Trainer watches for, and rolls back from: to the newest good checkpoint, skipping the step's batches
    check_nan: bool = True  # a NaN or infinite loss or gradient norm
    spike_zscore: float = 6.0  # a loss this many standard deviations above the recent window's mean (0: off)
    spike_window: int = 100  # steps in that moving window
    spike_warmup: int = 20  # steps seen before spikes are judged
    sdc_every: int = 0  # steps between checks that data-parallel replicas hold identical parameters (0: off)
    recompute_every: int = 0  # steps between recomputations of a step, which must give the same loss (0: off)
    max_rollbacks: int = 10  # more in one run is an error: something is wrong beyond a bad batch
    collective_timeout_s: int = 600  # a collective that takes longer has hung: the process fails, torchrun restarts


@dataclass
class FaultConfig:
    # faults injected on purpose, for tests and drills; each fires once per process (0 / -1 / []: off)
    nan_at_step: int = 0  # that step's loss becomes NaN
    spike_at_step: int = 0  # that step's loss is multiplied by spike_factor
    spike_factor: float = 30.0
    corrupt_rank: int = -1  # that rank changes one of its parameters after the optimizer step of corrupt_at_step
    corrupt_at_step: int = 0
    kill_rank_at_step: list = field(default_factory=list)  # [rank, step]: that rank SIGKILLs itself (first attempt)
    hang_rank_at_step: list = field(default_factory=list)  # [rank, step]: that rank stops responding (first attempt)


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (one is also written at the end and on SIGTERM/SIGINT)
    keep: int = 2  # how many of the newest checkpoints to keep
    sharded: bool = False  # each rank writes its own shards (torch.distributed.checkpoint), nothing gathered
    async_save: bool = False  # with sharded: written in the background while training goes on


@dataclass
class SampleConfig:
    prompts: list = field(default_factory=lambda: ["def ", "class ", "import "])
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0


@dataclass
class LoRASection:
    # post-training with LoRA adapters (posttrain/lora.py); rank 0: full fine-tuning
    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])  # any of wq wk wv wo w1 w2 w3


@dataclass
class PostTrainConfig:
    data: list = field(default_factory=list)  # training records (.jsonl / .parquet); [] = the embedded default
    eval_data: list = field(default_factory=list)  # held-out records; [] = the embedded held-out modules
    max_examples: int = 0  # cap on training examples (0: all)
    eval_examples: int = 64  # held-out examples scored (loss, and answers generated for token F1)
    max_new_tokens: int = 48  # answer length when scoring held-out answers
    beta: float = 0.1  # DPO: the strength of the KL constraint to the reference (Llama 3: 0.1)
    nll_alpha: float = 0.2  # DPO: weight of the NLL term on the chosen response (Llama 3: 0.2; 0: plain DPO)
    prompts: list = field(default_factory=list)  # rejection sampling: prompt records; [] = the embedded prompts
    max_prompts: int = 0  # rejection sampling: prompts used (0: all)
    samples_per_prompt: int = 4  # rejection sampling: K samples scored per prompt, the best kept
    temperature: float = 0.8  # rejection sampling's sampling temperature
    top_p: float = 1.0
    sample_batch: int = 8  # prompts sampled together (K each); also the unit of resumption
    ppo_rollout: int = 16  # PPO: prompts sampled per rollout
    ppo_epochs: int = 2  # PPO: optimizer steps on each rollout
    kl_coef: float = 0.05  # PPO: per-token KL penalty to the reference (TRL's default)
    kl_target: float = 6.0  # PPO: the KL (nats a reply) a run should stay under
    gamma: float = 1.0  # PPO's GAE discount and lambda (TRL's defaults)
    lam: float = 0.95
    cliprange: float = 0.2  # PPO's clipping of the policy ratio and of the values (TRL's defaults)
    cliprange_value: float = 0.2
    vf_coef: float = 0.1  # PPO: weight of the value loss (TRL's default)


@dataclass
class PostTrainingConfig:
    # what `herd run` does after pretraining, in order: any of sft, reward_model, rejection_sampling, dpo, ppo
    stages: list = field(default_factory=list)
    # per stage, `key=value` overrides of its built-in recipe (sft, rm, sample, dpo, ppo), e.g.
    # {sft = ["train.steps=300", "train.lr=2e-3"]}
    overrides: dict = field(default_factory=dict)


@dataclass
class EvalConfig:
    # what `herd run` evaluates at its end, on the base (pretrained) and the final (last post-training stage)
    # model: `herd eval` task names or PATH:LAYOUT; [] skips the evaluation
    tasks: list = field(default_factory=list)
    limit: int = 0  # the first N items of each task (0: all)
    num_fewshot: int = -1  # examples before each question (-1: each task's own default)
    chat_final: bool = False  # prompt the final model in the chat format (default: both with the same prompts)


@dataclass
class RunConfig:
    name: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoRASection = field(default_factory=LoRASection)
    posttrain: PostTrainConfig = field(default_factory=PostTrainConfig)
    posttraining: PostTrainingConfig = field(default_factory=PostTrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, key: str):
    """Check a TOML value (or parse a command-line string) against a field's type."""
    origin = typing.get_origin(typ) or typ
    if isinstance(value, str) and origin is not str:
        try:
            value = json.loads(value) if origin in (list, dict) else value
            if origin is bool:
                value = {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            elif origin in (int, float):
                value = origin(value.replace("_", ""))
        except (ValueError, KeyError, json.JSONDecodeError):
            raise HerdError(f"{key}: {value!r} is not a valid {origin.__name__}") from None
    if origin is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if origin is list and isinstance(value, str):
        value = [value]
    if not isinstance(value, origin) or (origin in (int, float) and isinstance(value, bool)):
        raise HerdError(f"{key}: expected {origin.__name__}, got {value!r}")
    return value


def _apply(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise HerdError(f"unknown recipe key {path!r}; expected one of: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise HerdError(f"{path}: expected a table of settings, got {value!r}")
            _apply(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def _set_dotted(obj, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    if parts[0] == "model" and len(parts) >= 2 and parts[1] != "preset":
        # model.n_layers=2 (or model.overrides.n_layers=2) overrides that ModelArgs field
        obj.model.overrides[parts[-1]] = _parse_scalar(raw)
        return
    if parts[0] == "curate" and len(parts) == 3:
        # curate.minhash_dedup.threshold=0.8 sets that parameter of that stage of curate.stages
        tables = [t for t in obj.curate.stages if isinstance(t, dict) and t.get("name") == parts[1]]
        if not tables:
            named = ", ".join(str(t.get("name")) for t in obj.curate.stages if isinstance(t, dict)) or "none"
            raise HerdError(f"{dotted}: no stage {parts[1]!r} in curate.stages (stages: {named})")
        tables[0][parts[2]] = _parse_scalar(raw)
        return
    value: dict = raw  # type: ignore[assignment]
    for part in reversed(parts[1:]):
        value = {part: value}
    _apply(obj, {parts[0]: value})


def _parse_scalar(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def builtin_recipes() -> list[tuple[str, str]]:
    """The built-in recipes as (name, description) pairs, sorted by name: the file stem and the text of
    the file's first comment line ("" when it has none)."""
    if not RECIPES_DIR.is_dir():
        return []
    recipes = []
    for path in sorted(RECIPES_DIR.glob("*.toml"), key=lambda p: p.stem):
        comment = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "")
        recipes.append((path.stem, comment.removeprefix("#").strip()))
    return recipes


def _known_recipes() -> str:
    return ", ".join(name for name, _ in builtin_recipes()) or "none"


def builtin_recipe(name: str) -> Path:
    """The file of a built-in recipe ("tiny" -> llamaherd/recipes/tiny.toml); an unknown name is an error."""
    path = RECIPES_DIR / f"{name}.toml"
    if not name or Path(name).name != name or not path.is_file():
        raise HerdError(f"no built-in recipe {name!r} (built-in recipes: {_known_recipes()})")
    return path


def resolve_recipe(name_or_path: str | None) -> Path:
    """A recipe file: a path, or the name of a built-in recipe ("tiny" -> llamaherd/recipes/tiny.toml)."""
    name_or_path = name_or_path or "tiny"
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.exists():
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise HerdError(f"recipe {name_or_path!r} not found (built-in recipes: {_known_recipes()})")
    return path


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- recipe file <- `key=value` overrides."""
    cfg = RunConfig()
    if recipe is not None:
        path = resolve_recipe(str(recipe))
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise HerdError(f"{path}: not valid TOML ({e})") from None
        _apply(cfg, data)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise HerdError(f"override {item!r} must look like section.key=value")
        _set_dotted(cfg, key.strip(), raw.strip())
    return cfg


def model_args(cfg: RunConfig, vocab_size: int | None = None):
    """The ModelArgs a run config describes; ``vocab_size`` (from the tokenizer) wins when given."""
    from llamaherd.model.args import ModelArgs, preset

    extra = dict(cfg.model.overrides)
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(ModelArgs)})
    if unknown:
        raise HerdError(f"unknown model setting(s) {', '.join('model.' + k for k in unknown)}; expected ModelArgs "
                        f"fields such as model.dim, model.n_layers, model.n_heads")
    if vocab_size is not None:
        extra["vocab_size"] = vocab_size
    args = preset(cfg.model.preset, **extra)
    if "max_seq_len" not in extra and args.max_seq_len < cfg.train.seq_len:
        args = args.replace(max_seq_len=cfg.train.seq_len)  # the preset's context grows to the training rows
    return args


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"cannot write {v!r} as TOML")


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as a TOML recipe (it loads back to the same config)."""
    lines = []
    sections = cfg.to_dict()
    for key, value in sections.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in sections.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"

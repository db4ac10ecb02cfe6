"""The run config as frozen, typed sections: what the loop, the train program, the AOT check and
the benchmarks read. `config.validate` builds it once from the ml-collections ConfigDict (the
user-facing form, with `--config.a.b=value` overrides); the ConfigDict stays only as data to
write (config.json, checkpoint meta, the run identity).

The dataclasses below hold the defaults of their sections and `config.base_config` is built
from them, so a new key is one line here. `model` and `lora` are the model's own
(`ModelConfig`, `LoraConfig`); their user-facing defaults stay in `base_config`.
"""

import dataclasses
import types
import typing
from collections.abc import Mapping

from lima_jax.errors import ConfigError
from lima_jax.model.config import ModelConfig
from lima_jax.model.lora import LoraConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """ICI axes per slice (one may be -1: the rest of the devices) and DCN axes across slices."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """LIMA data: paths may be local or gs://. See lima_jax/data/pipeline.py for the batch semantics."""
    train_path: str = ""
    tokenizer_path: str = ""
    dev_path: str = ""  # a LIMA-format dev file; with it, all of train_path trains (the paper's setup)
    dev_size: int = 50  # without dev_path: examples held out of train_path (0: no dev loss, no dev samples)
    sources: tuple = ()  # keep only examples whose `source` field is listed; () = all
    seq_len: int = 2048
    examples_per_step: int = 64  # LIMA: 32 for 65B, 64 for smaller models; exact on every mesh
    rows_per_step: int = -1  # packed [rows, seq_len] rows a step; -1 = the most any step needs (the plan)
    format: str = "auto"  # the record format: auto (detected from the first record), lima, openai, sharegpt, alpaca
    # Several train sources sampled by weight, replacing train_path: ((path, weight[, format]), ...),
    # e.g. --config.data.mixture="(('lima.jsonl', 3.0), ('mine.jsonl', 1.0))"; see data/pipeline.py.
    mixture: tuple = ()
    chat_format: str = "lima"  # lima | llama3 | chatml (lima_jax/data/chat_format.py); recorded in checkpoints
    train_on: str = "all"  # all: every assistant turn trains (LIMA's dialogues); last: the final one only
    # How the shuffled epochs' examples are dealt into steps: "balanced" (swaps a few examples between
    # the steps of an epoch so every step needs about the same rows) or "random" (the shuffle's order).
    grouping: str = "balanced"
    row_buckets: int = 1  # compiled step shapes (1-3): each step takes the fewest rows of them that hold it


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """LIMA: AdamW, lr 1e-5 decaying linearly to 1e-6 over the run, no warmup."""
    learning_rate: float = 1e-5
    end_learning_rate: float = 1e-6
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0  # clipping: not in the paper; HF Trainer's default


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 15  # LIMA's
    max_steps: int = -1  # > 0 stops early (smoke runs); the schedule still spans the full run
    grad_accum_steps: int = 1  # micro-batches per optimizer step (rows_per_step must divide)
    log_every_steps: int = 1
    checkpoint_every_steps: int = 0  # 0: only at the end of every epoch
    keep_epochs: tuple = (5, 6, 7, 8, 9, 10)  # LIMA chose among epochs 5-10; the latest is kept too
    async_checkpointing: bool = True
    eval_every_epoch: bool = True  # dev loss / perplexity after each epoch
    sample_dev_prompts: int = 3  # answers to this many dev prompts written next to each epoch's checkpoint
    sample_max_new_tokens: int = 256
    compilation_cache_dir: str = "~/.cache/lima_jax/xla"  # persistent; "" disables
    peak_flops_per_device: float = 0.0  # for MFU where the chip is not in train.metrics.PEAK_FLOPS; 0 = the table
    profile_steps: tuple = ()  # e.g. (5, 8): write a JAX profiler trace of steps 5..7 to WORKDIR/profile
    accept_changed: tuple = ()  # run-defining keys a resume may change deliberately, e.g. ("train.epochs",)
    # Where AdamW's moments wait between steps: "device", or "pinned_host" (host memory: their HBM is free
    # during the forward and backward passes, e.g. 65B on v4-64, for two host-device copies a step; same numbers).
    opt_state_memory: str = "device"
    # Weights & Biases (lima_jax/train/tracking.py; `pip install wandb`, WANDB_MODE=offline for no network):
    wandb: bool = False  # log metrics.jsonl's rows, the config and the dev answers; a resume continues the W&B run
    wandb_project: str = "lima_jax"
    # Epoch selection (lima_jax/train/selection.py): at the end of the run, `judge.py select` over the kept
    # epochs' answers to every dev prompt, by the judge at judge_url; the pick and its table in WORKDIR/select.
    select: bool = False
    judge_url: str = ""  # an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    judge_model: str = ""
    judge_api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding its API key (unset: none)

    def selected_epochs(self) -> list[int]:
        """The epochs `select` compares: the kept ones and the last (whose checkpoint is kept too)."""
        return sorted({e for e in self.keep_epochs if 0 < e <= self.epochs} | {self.epochs})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int
    model: ModelConfig
    mesh: MeshConfig
    data: DataConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    lora: LoraConfig | None  # None: full fine-tuning
    init_checkpoint: str  # converted weights (lima_jax.checkpoint layout); "" = random init


SECTIONS = {"mesh": MeshConfig, "data": DataConfig, "optimizer": OptimizerConfig, "train": TrainConfig}


def section_defaults() -> dict[str, dict]:
    """section -> its keys' defaults, for `config.base_config`."""
    return {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}


def build(c: Mapping) -> RunConfig:
    """The typed run config of a ConfigDict; a key no section has, or a value of the wrong type,
    is a ConfigError naming `config.section.key`. Keys the ConfigDict lacks take the defaults."""
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key in c:
        if key not in known:
            raise ConfigError(f"config.{key}: unknown key; the config has {sorted(known)}")
    sections = {name: cls(**checked(cls, c.get(name) or {}, name)) for name, cls in SECTIONS.items()}
    lora = checked(LoraConfig, c.get("lora") or {}, "lora")
    return RunConfig(seed=check(c.get("seed", 0), int, "config.seed"),
                     model=ModelConfig(**checked(ModelConfig, c["model"], "model")),
                     lora=LoraConfig.from_config(lora),
                     init_checkpoint=check(c.get("init_checkpoint", ""), str, "config.init_checkpoint"), **sections)


def checked(cls, values: Mapping, section: str) -> dict:
    """`values` (config.<section>) checked against the fields of dataclass `cls`."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"config.{section}.{unknown[0]}: unknown key{' (and ' + ', '.join(unknown[1:]) + ')' if unknown[1:] else ''}"
                          f"; config.{section} has {', '.join(fields)}")
    return {k: check(v, fields[k], f"config.{section}.{k}") for k, v in values.items()}


def check(value, kind, key: str):
    """`value` as a `kind` (int, float, str, bool, tuple, X | None); ints pass as floats, lists as tuples."""
    if isinstance(kind, types.UnionType):
        if value is None and type(None) in kind.__args__:
            return None
        kind = next(a for a in kind.__args__ if a is not type(None))
    kind = typing.get_origin(kind) or kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: must be {kind.__name__}, not {type(value).__name__}")
    return value

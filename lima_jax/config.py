"""The LIMA recipe as one base config, and the early validation of a config against devices.

`configs/*.py` call `base_config()` and update the model size (and the per-size recipe
values); every value can be overridden with `--config.key=value`. `validate` runs before
anything is compiled, so a config that cannot work fails with a message naming the key.
"""

import importlib.util

import ml_collections

from lima_jax.data.chat_format import FORMATS, TRAIN_ON
from lima_jax.data.pipeline import GROUPINGS, data_sources
from lima_jax.errors import ConfigError
from lima_jax.model.config import ROPE_SCALING_KEYS, ModelConfig
from lima_jax.model.lora import LoraConfig
from lima_jax.run_config import RunConfig, build, section_defaults
from lima_jax.sharding import MEMORY_KINDS, resolve_mesh_shape


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # LLaMA-1 architecture defaults; size files set dim/layers/heads/ffn. vocab_size is 32,001:
    # LLaMA's 32,000 pieces plus LIMA's end-of-turn token (id 32000).
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32001, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
        norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048, vocab_multiple=128,
        dtype="bfloat16", param_dtype="float32", remat_policy="full", scan_layers=True,
        attention="xla", residual_dropout=0.2, logits_chunks=4,
        # None: the backend's choice (lima_jax/backend.py); True/False/a number override it.
        transposed_wgrad=ml_collections.config_dict.placeholder(bool),
        causal_blocks=ml_collections.config_dict.placeholder(int),
        kv_position_major=ml_collections.config_dict.placeholder(bool),
        # Family switches (lima_jax/model/config.py), off for LLaMA; head_dim None: dim / n_heads. The
        # RoPE scaling is taken from config.init_checkpoint when it has one (adopt_checkpoint_rope).
        **{**ModelConfig.family_defaults(), "head_dim": ml_collections.config_dict.placeholder(int)},
    ))

    # mesh, data, optimizer, train: defaults and comments in lima_jax/run_config.py (one line a key).
    for name, values in section_defaults().items():
        c[name] = ml_collections.ConfigDict(values)
    c.init_checkpoint = ""  # converted weights (lima_jax.checkpoint layout); "" = random init
    # LoRA (lima_jax/model/lora.py): rank > 0 trains low-rank adapters on these projections and
    # freezes the base (init_checkpoint) in base_dtype; the optimizer sees the adapters only.
    c.lora = ml_collections.ConfigDict(dict(
        rank=0,  # 0: full fine-tuning
        alpha=16.0,  # the adapters' update is scaled by alpha / rank
        dropout=0.0,  # on the adapters' input (training only)
        targets=("q", "k", "v", "o", "gate", "up", "down"),
        base_dtype="bfloat16",  # the frozen base: bfloat16, float32, or int8 with per-channel scales
    ))
    return c


def set_llama(c: ml_collections.ConfigDict, *, dim, n_layers, n_heads, ffn_dim, n_kv_heads=None, norm_eps=1e-6,
              max_seq_len=2048, residual_dropout=0.2) -> ml_collections.ConfigDict:
    """Set one LLaMA size on a base config (the size files are one call to this)."""
    c.model.update(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads, ffn_dim=ffn_dim,
                   norm_eps=norm_eps, max_seq_len=max_seq_len, residual_dropout=residual_dropout)
    return c


def adopt_checkpoint_rope(c: ml_collections.ConfigDict) -> None:
    """Set config.model's RoPE scaling to config.init_checkpoint's (a converted Llama 3.1 has
    llama3 scaling, a Llama 3.0 of the same shapes none). A config that sets a scaling of its
    own must agree with the checkpoint's."""
    if not c.get("init_checkpoint"):
        return
    from lima_jax import checkpoint  # read only when there is a checkpoint to read

    saved = checkpoint.read_meta_json(c.init_checkpoint).get("model") or {}
    defaults = ModelConfig.family_defaults()
    theirs = {k: saved.get(k, defaults[k]) for k in ROPE_SCALING_KEYS}
    ours = {k: c.model.get(k, defaults[k]) for k in ROPE_SCALING_KEYS}
    if ours["rope_type"] != "default" and ours != theirs:
        key = next(k for k in ROPE_SCALING_KEYS if ours[k] != theirs[k])
        raise ConfigError(f"config.model.{key}={ours[key]!r} but config.init_checkpoint={c.init_checkpoint} was "
                          f"converted with {key}={theirs[key]!r}: leave the RoPE scaling to the checkpoint")
    c.model.update(theirs)


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    return ModelConfig.from_config(c.model)


def lora_config(c: ml_collections.ConfigDict) -> LoraConfig | None:
    """The LoRA settings, or None for full fine-tuning (rank 0, or a config from before LoRA)."""
    rank = c.get("lora", {}).get("rank", 0)
    if not isinstance(rank, int) or rank < 0:
        raise ConfigError(f"config.lora.rank={rank!r}: 0 (full fine-tuning) or a positive rank")
    return LoraConfig.from_config(c.get("lora"))


# Counts that must be at least this (config key -> minimum).
_MINIMUM = {"data.examples_per_step": 1, "data.seq_len": 1, "data.dev_size": 0, "train.epochs": 1,
            "train.grad_accum_steps": 1, "train.log_every_steps": 1, "train.checkpoint_every_steps": 0,
            "train.sample_dev_prompts": 0, "train.sample_max_new_tokens": 1, "model.logits_chunks": 1}


def validate_values(c: ml_collections.ConfigDict) -> None:
    """Checks that need no devices and no data; raises ConfigError naming the config key."""
    for key, minimum in _MINIMUM.items():
        section, name = key.split(".")
        value = c[section][name]
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(f"config.{key}={value!r}: must be an integer >= {minimum}")
    rows = c.data.rows_per_step
    if not isinstance(rows, int) or rows == 0 or rows < -1:
        raise ConfigError(f"config.data.rows_per_step={rows!r}: a positive number of rows, or -1 (sized by the plan)")
    if rows > 0 and rows % c.train.grad_accum_steps:
        raise ConfigError(f"config.train.grad_accum_steps={c.train.grad_accum_steps} does not divide "
                          f"config.data.rows_per_step={rows}")
    grouping, buckets = c.data.get("grouping", "random"), c.data.get("row_buckets", 1)
    if grouping not in GROUPINGS:
        raise ConfigError(f"config.data.grouping={grouping!r}: one of {list(GROUPINGS)}")
    if isinstance(buckets, bool) or buckets not in (1, 2, 3):
        raise ConfigError(f"config.data.row_buckets={buckets!r}: 1, 2 or 3 compiled step shapes")
    if buckets > 1 and rows > 0:
        raise ConfigError(f"config.data.row_buckets={buckets} needs config.data.rows_per_step=-1 (the plan sizes "
                          f"the buckets), not {rows}")
    if c.data.seq_len > c.model.max_seq_len:
        raise ConfigError(f"config.data.seq_len={c.data.seq_len} is longer than config.model.max_seq_len="
                          f"{c.model.max_seq_len}, the context the model's positions cover")
    for key, choices in (("chat_format", FORMATS), ("train_on", TRAIN_ON)):
        if c.data[key] not in choices:
            raise ConfigError(f"config.data.{key}={c.data[key]!r}: choose one of {', '.join(choices)}")
    for key in ("optimizer.learning_rate", "optimizer.end_learning_rate"):
        section, name = key.split(".")
        if not c[section][name] >= 0:
            raise ConfigError(f"config.{key}={c[section][name]!r}: must be >= 0")
    memory = c.train.get("opt_state_memory", "device")
    if memory not in MEMORY_KINDS:
        raise ConfigError(f"config.train.opt_state_memory={memory!r}: one of {list(MEMORY_KINDS)}")
    lora_config(c)  # raises ConfigError naming the config.lora key
    data_sources(c.data)  # raises ConfigError naming config.data.format or config.data.mixture
    unknown = [k for k in c.train.accept_changed if k not in RUN_DEFINING and k.split(".")[0] not in RUN_DEFINING]
    if unknown:
        raise ConfigError(f"config.train.accept_changed names {sorted(unknown)}: not run-defining keys; "
                          f"choose from {list(RUN_DEFINING)}")


# What defines a run: a resume must match these (or list them in config.train.accept_changed).
# The mesh, rows a step, micro-batches and speed settings may change: the steps stay the same.
RUN_DEFINING = ("seed", "model", "data.train", "data.dev", "data.sources", "data.dev_size", "data.seq_len",
                "data.examples_per_step", "data.grouping", "train.epochs", "optimizer", "lora")
_FAMILY_DEFAULTS = ModelConfig.family_defaults()
_MODEL_SPEED_KEYS = ("remat_policy", "scan_layers", "attention", "logits_chunks", "transposed_wgrad", "causal_blocks",
                     "kv_position_major")


def run_identity(c: ml_collections.ConfigDict, train_digest: str, dev_digest: str) -> dict:
    """The run-defining values of a config (RUN_DEFINING), with the data as content digests."""
    model = {k: v for k, v in c.model.to_dict().items() if k not in _MODEL_SPEED_KEYS
             and not (k in _FAMILY_DEFAULTS and v == _FAMILY_DEFAULTS[k])}  # as runs from before the switches
    return {"seed": c.seed, "model": model, "data.train": train_digest, "data.dev": dev_digest,
            "data.sources": sorted(c.data.sources), "data.dev_size": 0 if c.data.dev_path else c.data.dev_size,
            "data.seq_len": c.data.seq_len, "data.examples_per_step": c.data.examples_per_step,
            "train.epochs": c.train.epochs, "optimizer": c.optimizer.to_dict(), **grouping_identity(c), **lora_identity(c)}


def grouping_identity(c: ml_collections.ConfigDict) -> dict:
    """Which examples share a step: absent for "random" (as before `data.grouping` existed), so a
    run started before it resumes with --config.data.grouping=random and is refused without."""
    grouping = c.data.get("grouping", "random")
    return {} if grouping == "random" else {"data.grouping": grouping}


def lora_identity(c: ml_collections.ConfigDict) -> dict:
    """A LoRA run is defined by its adapters' settings and by the base they adapt; a full
    fine-tuning run's identity has no `lora` entry (as before LoRA existed)."""
    lora = lora_config(c)
    return {} if lora is None else {"lora": dict(lora.to_dict(), base=c.init_checkpoint)}


def is_accepted(key: str, accepted) -> bool:
    """`model.dim` is accepted by `model.dim` or by `model`."""
    return key in accepted or key.split(".")[0] in accepted


def run_value(identity: dict, key: str):
    """A run identity's value for a key of `changed_run_keys` (`model.dim` looks inside `model`)."""
    if key in identity:
        return identity[key]
    head, _, rest = key.partition(".")
    return identity.get(head, {}).get(rest)


def changed_run_keys(saved: dict, current: dict) -> list[str]:
    """The run-defining keys whose values differ (nested ones as `model.dim`)."""
    out = []
    for key in RUN_DEFINING:
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{key}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            out.append(key)
    return out


def run_config(c: ml_collections.ConfigDict) -> RunConfig:
    """The typed run config, checked without devices (`validate_values`, then every key's type)."""
    validate_values(c)
    run = build(c)
    check_end_of_run(run)
    return run


def check_end_of_run(run: RunConfig) -> None:
    """What W&B tracking and the epoch selection need, checked before anything runs."""
    train = run.train
    if train.select:
        missing = [k for k in ("judge_url", "judge_model") if not getattr(train, k)]
        if missing:
            raise ConfigError(f"config.train.select=True needs config.train.{missing[0]}: the judge's OpenAI-compatible "
                              "endpoint and model name")
        if not train.eval_every_epoch:
            raise ConfigError("config.train.select=True needs config.train.eval_every_epoch=True: the epochs' dev "
                              "answers are written at the end of each epoch")
        if len(train.selected_epochs()) < 2:
            raise ConfigError(f"config.train.select=True compares the kept epochs (config.train.keep_epochs="
                              f"{train.keep_epochs} within config.train.epochs={train.epochs}, and the last): "
                              "keep at least two")
        if not run.data.dev_path and not run.data.dev_size:
            raise ConfigError("config.train.select=True needs dev prompts: set config.data.dev_path or "
                              "config.data.dev_size > 0")
    for key, package in (("select", "openai"), ("wandb", "wandb")):
        if getattr(train, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"config.train.{key}=True needs the {package} package: pip install {package}")


def validate(c: ml_collections.ConfigDict, num_devices: int, num_slices: int = 1) -> RunConfig:
    """Check a config against the devices before compiling; returns the typed run config.

    Raises ConfigError naming the offending config key."""
    run = run_config(c)
    model = run.model
    ici, dcn = resolve_mesh_shape(run.mesh, num_devices, num_slices)
    tensor = ici[-1] * dcn[-1]
    for key, value in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.n_kv_heads),
                       ("model.ffn_dim", model.ffn_dim)):
        if value % tensor:
            raise ConfigError(f"config.{key}={value} is not divisible by the tensor-parallel size "
                              f"{tensor} (config.mesh.tensor x config.mesh.dcn_tensor)")
    if model.padded_vocab_size % tensor:
        raise ConfigError(f"the padded vocabulary {model.padded_vocab_size} is not divisible by the tensor-parallel "
                          f"size {tensor}: raise config.model.vocab_multiple")
    if model.attention == "splash" and run.data.seq_len % 128:
        raise ConfigError(f"config.model.attention='splash' tiles the sequence by 128: config.data.seq_len="
                          f"{run.data.seq_len} is not a multiple of 128")
    if model.attention == "cudnn" and model.dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"config.model.attention='cudnn' runs in bfloat16 or float16, not config.model.dtype="
                          f"{model.dtype!r}")
    return run

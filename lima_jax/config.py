"""The LIMA recipe as one base config, and the early validation of a config against devices.

`configs/*.py` call `base_config()` and update the model size (and the per-size recipe
values); every value can be overridden with `--config.key=value`. `validate` runs before
anything is compiled, so a config that cannot work fails with a message naming the key.
"""

import ml_collections

from lima_jax.data.chat_format import FORMATS, TRAIN_ON
from lima_jax.data.pipeline import GROUPINGS, data_sources
from lima_jax.errors import ConfigError
from lima_jax.model.config import ROPE_SCALING_KEYS, ModelConfig
from lima_jax.model.lora import LoraConfig
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
        # Family switches (lima_jax/model/config.py), off for LLaMA; head_dim None: dim / n_heads. The
        # RoPE scaling is taken from config.init_checkpoint when it has one (adopt_checkpoint_rope).
        **{**ModelConfig.family_defaults(), "head_dim": ml_collections.config_dict.placeholder(int)},
    ))

    # ICI axes per slice (one may be -1: the rest of the devices) and DCN axes across slices.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))

    # LIMA data: paths may be local or gs://. See lima_jax/data/pipeline.py for the batch semantics.
    c.data = ml_collections.ConfigDict(dict(
        train_path="", tokenizer_path="",
        dev_path="",  # a LIMA-format dev file; with it, all of train_path trains (the paper's setup)
        dev_size=50,  # without dev_path: examples held out of train_path (0: no dev loss, no dev samples)
        sources=(),  # keep only examples whose `source` field is listed; () = all
        seq_len=2048,
        examples_per_step=64,  # LIMA: 32 for 65B, 64 for smaller models; exact on every mesh
        rows_per_step=-1,  # packed [rows, seq_len] rows a step; -1 = the most any step needs (the plan)
        format="auto",  # the record format: auto (detected from the first record), lima, openai, sharegpt, alpaca
        # Several train sources sampled by weight, replacing train_path: ((path, weight[, format]), ...),
        # e.g. --config.data.mixture="(('lima.jsonl', 3.0), ('mine.jsonl', 1.0))"; see data/pipeline.py.
        mixture=(),
        chat_format="lima",  # lima | llama3 | chatml (lima_jax/data/chat_format.py); recorded in checkpoints
        train_on="all",  # all: every assistant turn trains (LIMA's dialogues); last: the final one only
        # How the shuffled epochs' examples are dealt into steps: "balanced" (swaps a few examples between
        # the steps of an epoch so every step needs about the same rows) or "random" (the shuffle's order).
        grouping="balanced",
        row_buckets=1,  # compiled step shapes (1-3): each step takes the fewest rows of them that hold it
    ))

    # LIMA: AdamW, lr 1e-5 decaying linearly to 1e-6 over the run, no warmup, 15 epochs.
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-5, end_learning_rate=1e-6, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1, grad_clip_norm=1.0,  # clipping: not in the paper; HF Trainer's default
    ))
    c.train = ml_collections.ConfigDict(dict(
        epochs=15,
        max_steps=-1,  # > 0 stops early (smoke runs); the schedule still spans the full run
        grad_accum_steps=1,  # micro-batches per optimizer step (rows_per_step must divide)
        log_every_steps=1,
        checkpoint_every_steps=0,  # 0: only at the end of every epoch
        keep_epochs=(5, 6, 7, 8, 9, 10),  # LIMA chose among epochs 5-10; the latest is kept too
        async_checkpointing=True,
        eval_every_epoch=True,  # dev loss / perplexity after each epoch
        sample_dev_prompts=3,  # answers to this many dev prompts written next to each epoch's checkpoint
        sample_max_new_tokens=256,
        compilation_cache_dir="~/.cache/lima_jax/xla",  # persistent; "" disables
        peak_flops_per_device=0.0,  # for MFU where the chip is not in train.metrics.PEAK_FLOPS; 0 = the table
        profile_steps=(),  # e.g. (5, 8): write a JAX profiler trace of steps 5..7 to WORKDIR/profile
        accept_changed=(),  # run-defining keys a resume may change deliberately, e.g. ("train.epochs",)
        # Where AdamW's moments wait between steps: "device", or "pinned_host" (host memory: their HBM
        # is free during the forward and backward passes, e.g. 65B on v4-64, for two host-device
        # copies a step; the same numbers either way).
        opt_state_memory="device",
    ))
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
_MODEL_SPEED_KEYS = ("remat_policy", "scan_layers", "attention", "logits_chunks", "transposed_wgrad", "causal_blocks")


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


def validate(c: ml_collections.ConfigDict, num_devices: int, num_slices: int = 1) -> ModelConfig:
    """Check a config against the devices before compiling; returns the model config.

    Raises ConfigError naming the offending config key."""
    validate_values(c)
    model = model_config(c)
    ici, dcn = resolve_mesh_shape(c.mesh, num_devices, num_slices)
    tensor = ici[-1] * dcn[-1]
    for key, value in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.n_kv_heads),
                       ("model.ffn_dim", model.ffn_dim)):
        if value % tensor:
            raise ConfigError(f"config.{key}={value} is not divisible by the tensor-parallel size "
                              f"{tensor} (config.mesh.tensor x config.mesh.dcn_tensor)")
    if model.padded_vocab_size % tensor:
        raise ConfigError(f"the padded vocabulary {model.padded_vocab_size} is not divisible by the tensor-parallel "
                          f"size {tensor}: raise config.model.vocab_multiple")
    if model.attention == "splash" and c.data.seq_len % 128:
        raise ConfigError(f"config.model.attention='splash' tiles the sequence by 128: config.data.seq_len="
                          f"{c.data.seq_len} is not a multiple of 128")
    if model.attention == "cudnn" and model.dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"config.model.attention='cudnn' runs in bfloat16 or float16, not config.model.dtype="
                          f"{model.dtype!r}")
    return model

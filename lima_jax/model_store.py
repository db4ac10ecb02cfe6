"""A checkpoint as a model: the typed record every checkpoint holds, and the one code that turns
a checkpoint back into (config, params, tokenizer, meta).

- `CheckpointMeta`: the model config, the tokenizer the weights were trained with, the chat
  format, the EOT id, the LoRA record (settings and base), the run identity. It is stored as the
  JSON item `meta` of every step (lima_jax.checkpoint deals in that JSON only); checkpoints
  written before it was typed (the model and LoRA settings as plain dicts, the tokenizer as a
  bare base64 SentencePiece proto) read the same.
- `load_model(path)`: a work dir, checkpoint root or step folder -> a `LoadedModel` on a mesh
  (sampling, chat, serving).
- The tokenizer is chosen in one place (`choose_tokenizer`, `training_tokenizer`), where it is
  checked against the weights and the EOT id inferred.
- A LoRA checkpoint's base is rebuilt in one place: `frozen_base` on the devices (training,
  and `load_model`, which merges the adapters in), `MergedReader` tensor by tensor on the host
  (the Hugging Face export).
"""

import base64
import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any

from lima_jax import checkpoint
from lima_jax.errors import ConfigError, ConversionError, DamagedCheckpoint, LoraBaseChanged
from lima_jax.model.config import ModelConfig
from lima_jax.model.lora import TARGETS, LoraConfig, get_path, set_path, target_path
from lima_jax.run_config import RunConfig

log = logging.getLogger(__name__)

LIMA_FORMAT = "lima"  # BOS, each turn + EOT (lima_jax.data.format)


# ---- the meta record ----

@dataclasses.dataclass(frozen=True)
class LoraRecord:
    """A LoRA checkpoint's `params` are the adapters only: their settings, and the frozen base they
    apply to: `base_checkpoint` (a converted checkpoint; "" for the random init of `base_seed`)
    and that base's parameter fingerprint when it was trained (None: not recorded)."""

    settings: LoraConfig
    base_checkpoint: str = ""
    base_seed: int = 0
    base_fingerprint: str | None = None

    def to_json(self) -> dict:  # flat, as written before the record was typed
        return dict(self.settings.to_dict(), base_checkpoint=self.base_checkpoint, base_seed=self.base_seed,
                    base_fingerprint=self.base_fingerprint)

    @classmethod
    def from_json(cls, record: dict | None) -> "LoraRecord | None":
        settings = LoraConfig.from_record(record)
        if settings is None:
            return None
        return cls(settings, record.get("base_checkpoint") or "", int(record.get("base_seed") or 0),
                   record.get("base_fingerprint"))


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """The one `meta` record of every checkpoint: written by training and conversion, read by
    training (resume checks, the LoRA base), sampling, serving and export.

    model: the model's config. eot_id: the end-of-turn id, None for a base model converted
    without it. tokenizer: the tokenizer the weights were trained with, as `Tokenizer.to_record()`
    stores it (the bare SentencePiece proto in older checkpoints; None if unknown), so nothing
    guesses. chat_format: how conversations become ids ("lima"; None: a base model, raw
    text only). config: the training config (training checkpoints). run: the run-defining values
    a resume must match. source: where the weights came from ("train", or a conversion record).
    lora: in a LoRA checkpoint, the adapters' settings and base; None otherwise."""

    model: ModelConfig
    step: int = 0
    eot_id: int | None = None
    tokenizer: dict | bytes | None = None
    chat_format: str | None = None
    config: dict | None = None
    run: dict | None = None
    source: dict = dataclasses.field(default_factory=dict)
    lora: LoraRecord | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "step": self.step, "eot_id": self.eot_id,
                "tokenizer": base64.b64encode(self.tokenizer).decode("ascii") if isinstance(self.tokenizer, bytes)
                else self.tokenizer,
                "chat_format": self.chat_format, "config": self.config, "run": self.run, "source": self.source,
                "lora": None if self.lora is None else self.lora.to_json()}

    @classmethod
    def from_json(cls, record: dict, where="the checkpoint") -> "CheckpointMeta":
        model = record.get("model") or (record.get("config") or {}).get("model")
        if not model:
            raise ConfigError(f"{where}: its meta has neither a model config nor a training config; pass --config")
        eot_id = record.get("eot_id")
        return cls(model=ModelConfig.from_config(model), step=int(record.get("step") or 0), eot_id=eot_id,
                   tokenizer=_stored_tokenizer(record.get("tokenizer")),
                   # written before formats were recorded: a model with EOT speaks LIMA's format
                   chat_format=record["chat_format"] if "chat_format" in record else
                   (LIMA_FORMAT if eot_id is not None else None),
                   config=record.get("config"), run=record.get("run"), source=record.get("source") or {},
                   lora=LoraRecord.from_json(record.get("lora")))


def _stored_tokenizer(value) -> dict | bytes | None:
    """A meta's tokenizer as read: a record dict, or (older checkpoints) a base64 SentencePiece proto."""
    return base64.b64decode(value) if isinstance(value, str) else value


def read_meta(path) -> CheckpointMeta:
    """The meta record of a checkpoint (a work dir, checkpoint root or step folder: see `checkpoint.locate`)."""
    return CheckpointMeta.from_json(checkpoint.read_meta_json(path), where=path)


def save_params(directory, params, meta: CheckpointMeta, step: int = 0):
    """A params-only checkpoint (converted weights) with its meta record; see `checkpoint.save_params`."""
    return checkpoint.save_params(directory, params, meta.to_json(), step)


# ---- the tokenizer: chosen here, checked against the weights, EOT inferred once ----

def open_tokenizer(record, where: str = "the checkpoint's tokenizer"):
    """The tokenizer a meta stores; `where` names it in the error."""
    from lima_jax.data.tokenizer import tokenizer_from_record

    try:
        return tokenizer_from_record(record)
    except (RuntimeError, ValueError, KeyError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where} does not load ({type(e).__name__}: {e})") from None


def choose_tokenizer(meta: CheckpointMeta, where, *, config=None, tokenizer_path: str | None = None,
                     required: bool = True, check: bool = True) -> tuple[Any, str]:
    """(tokenizer, where it came from) for a checkpoint, in this order: `tokenizer_path` (a file or
    a folder holding tokenizer.model), the one stored in the checkpoint, `config.data.tokenizer_path`
    (`config`: the effective config, else the checkpoint's training config), and the demo
    tokenizer only when that config says tokenizer_path "" (the tiny demo). None of these: a
    ConfigError, or (None, why) when not `required`. The chosen one must fit the weights
    (`check_tokenizer_fits`; `check=False`: the caller checks it, as the HF export's files do)."""
    from lima_jax.data.tokenizer import load_tokenizer

    if tokenizer_path is not None:
        tokenizer, origin = load_tokenizer(tokenizer_path), tokenizer_path
    elif meta.tokenizer is not None:
        tokenizer, origin = open_tokenizer(meta.tokenizer), "the checkpoint's tokenizer"
    else:
        named = ((config if config is not None else meta.config or {}).get("data") or {}).get("tokenizer_path")
        if named:
            tokenizer, origin = load_tokenizer(named), named
        elif ((meta.config or {}).get("data") or {}).get("tokenizer_path") == "":  # trained on the demo data
            tokenizer, origin = load_tokenizer(""), "the demo tokenizer"
        elif required:
            raise ConfigError(f"{where} stores no tokenizer and its config names none: pass --tokenizer "
                              "(the tokenizer.model or tokenizer.json the weights were released or trained with)")
        else:
            return None, f"{where} stores no tokenizer and none was given"
    if check:
        check_tokenizer_fits(tokenizer, origin, meta, where)
    return tokenizer, origin


def eot_id(meta: CheckpointMeta, tokenizer) -> int | None:
    """The model's end-of-turn id: the recorded one; else the tokenizer's own end-of-turn token
    where it has one; else, for a checkpoint with the row LIMA adds (written before eot_id was
    recorded), that row, as in training; else None (a base model)."""
    if meta.eot_id is not None or tokenizer is None:
        return meta.eot_id
    if not tokenizer.eot_added:  # the vocabulary's own end-of-turn token (Llama 3, Qwen)
        return tokenizer.eot_id
    return tokenizer.eot_id if meta.model.vocab_size == tokenizer.vocab_size else None


def check_tokenizer_fits(tokenizer, origin: str, meta: CheckpointMeta, where) -> None:
    """The weights were trained with this tokenizer: a tokenizer with its own end-of-turn token
    (HF) fits a model with at least its ids and that EOT; with LIMA's added row, a fine-tuned
    model's EOT id is the piece count, and a base model (no EOT row) has exactly the pieces."""
    vocab_size, recorded = meta.model.vocab_size, meta.eot_id
    if not tokenizer.eot_added:
        fits = tokenizer.vocab_size <= vocab_size and recorded in (None, tokenizer.eot_id)
        expected = f"{vocab_size} rows and end of turn {recorded}"
        have = f"{tokenizer.vocab_size} ids (end of turn {tokenizer.eot_id})"
    else:
        pieces = tokenizer.vocab_size - 1
        have = f"{pieces} pieces" + (" (more than the model has rows)" if pieces > vocab_size else "")
        if recorded is not None:
            fits, expected = pieces == recorded, f"its EOT id {recorded} needs {recorded} pieces"
        else:
            fits, expected = pieces in (vocab_size, vocab_size - 1), f"a {vocab_size}-token base model needs {vocab_size}"
    if not fits:
        raise ConfigError(f"{origin} has {have} but {where} does not fit it: {expected}; this is not the tokenizer "
                          "the weights were trained with: pass the right one with --tokenizer")


def training_tokenizer(config: RunConfig):
    """The tokenizer a run trains with, when `config.init_checkpoint` names one: the one stored
    there when `data.tokenizer_path` is empty; a given tokenizer must be that one (the weights
    were trained with it). None: the data pipeline loads `data.tokenizer_path` itself."""
    if not config.init_checkpoint:
        return None
    from lima_jax.data.tokenizer import load_tokenizer

    stored = read_meta(config.init_checkpoint).tokenizer
    if stored is None or not config.data.tokenizer_path:
        return None if stored is None else open_tokenizer(stored)
    given = load_tokenizer(config.data.tokenizer_path)
    if not given.same_as(open_tokenizer(stored)):
        raise ConfigError(f"config.data.tokenizer_path={config.data.tokenizer_path} is not the tokenizer stored with "
                          f"config.init_checkpoint={config.init_checkpoint}; leave tokenizer_path empty to use that one")
    return given


# ---- the LoRA base: rebuilt as training held it ----

def lora_record(config: RunConfig) -> LoraRecord | None:
    """What a LoRA run's checkpoints record besides the adapters (None: full fine-tuning): their
    settings, and their base with the fingerprint of its parameters as they are now."""
    settings = config.lora
    if settings is None:
        return None
    base = config.init_checkpoint
    return LoraRecord(settings, base, config.seed, checkpoint.params_fingerprint(base) if base else None)


def check_base(trained_on: LoraRecord, now: str | None, where) -> None:
    """LoraBaseChanged unless the base checkpoint's parameter fingerprint is still `now` the one
    the adapters of `where` were trained on (not compared where either is unknown: a checkpoint
    saved before fingerprints existed)."""
    then = trained_on.base_fingerprint
    if trained_on.base_checkpoint and then and now and then != now:
        raise LoraBaseChanged(f"{where} holds LoRA adapters trained on the base {trained_on.base_checkpoint} (params "
                              f"fingerprint {then}), but {trained_on.base_checkpoint} now holds other weights "
                              f"(fingerprint {now})")


def check_resumed_base(step_dir, current: LoraRecord) -> None:
    """A LoRA resume: the base named by the config, if it is the one the checkpoint at `step_dir`
    names, must still hold the weights its adapters were trained on. A step whose meta does not
    read is left to the restore's fallback."""
    try:
        saved = read_meta(step_dir).lora
    except Exception:  # noqa: BLE001  a damaged step: the restore sets it aside
        return
    if saved is not None and saved.base_checkpoint == current.base_checkpoint:
        check_base(saved, current.base_fingerprint, step_dir)


def frozen_base(record: LoraRecord, cfg: ModelConfig, mesh, shardings=None, say: Callable[[str], None] = log.info):
    """A LoRA model's frozen base as training holds it (`lora.base_dtype`; int8 layer matrices
    quantized per channel) on `shardings` (default: the base's own, lora.base_logical_axes): the
    weights of `record.base_checkpoint`, or the random init of `record.base_seed`. An int8 base is
    read one layer matrix at a time, so the devices never hold the whole bfloat16 base beside it."""
    import jax
    import jax.numpy as jnp

    from lima_jax.model import abstract_params, init_params, lora as lora_lib, param_logical_axes
    from lima_jax.sharding import named_shardings

    lora = record.settings
    if shardings is None:
        shardings = named_shardings(lora_lib.base_logical_axes(cfg, lora), mesh)
    dense_shardings = named_shardings(param_logical_axes(cfg), mesh)
    to_base = jax.jit(lambda p: lora_lib.frozen_base(p, lora), out_shardings=shardings, donate_argnums=0)
    path = record.base_checkpoint
    if not path:
        say(f"LoRA base (frozen, {lora.base_dtype}): random init of seed {record.base_seed}")
        return to_base(jax.jit(init_params, static_argnums=0, out_shardings=dense_shardings)(
            cfg, jax.random.key(record.base_seed)))
    say(f"LoRA base (frozen, {lora.base_dtype}) from {path}")
    if lora.base_dtype == "int8":
        return _read_int8_base(path, cfg, dense_shardings, shardings)
    dtype = jnp.float32 if lora.base_dtype == "float32" else jnp.bfloat16
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), abstract_params(cfg))
    return to_base(checkpoint.restore_params(path, abstract, dense_shardings))


def _read_int8_base(path, cfg: ModelConfig, dense_shardings, base_shardings) -> dict:
    """An int8 base: restored in bfloat16 one layer matrix at a time, each quantized on the devices."""
    import jax
    import jax.numpy as jnp

    from lima_jax.model import abstract_params, lora as lora_lib

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract_params(cfg))
    matrices = {("layers", *path_): n_in for path_, n_in in TARGETS.values()}
    base = checkpoint.restore_params(path, _without(abstract, matrices), _without(dense_shardings, matrices), part=True)
    for key, n_in in matrices.items():
        leaf = get_path(checkpoint.restore_params(path, _only(abstract, key), _only(dense_shardings, key), part=True),
                        key)
        quantize = jax.jit(lambda w, n=n_in: lora_lib.quantize(w, n), out_shardings=get_path(base_shardings, key),
                           donate_argnums=0)
        set_path(base, key, quantize(leaf))
    return base


def _only(tree: dict, key: tuple) -> dict:  # the nested dict holding just the leaf at `key`
    return {key[0]: _only(tree[key[0]], key[1:])} if len(key) > 1 else {key[0]: tree[key[0]]}


def _without(tree: dict, keys, prefix: tuple = ()) -> dict:  # the nested dict without the leaves at `keys`
    out = {k: _without(v, keys, prefix + (k,)) if isinstance(v, dict) else v for k, v in tree.items()
           if prefix + (k,) not in keys}
    return {k: v for k, v in out.items() if v != {}}  # no empty branches: Orbax reads them as leaves


def lora_of(meta: CheckpointMeta, where) -> LoraRecord:
    """The LoRA record of a checkpoint that must have one."""
    if meta.lora is None:
        raise ConversionError(f"{where} is not a LoRA checkpoint (its meta records no lora settings)")
    return meta.lora


def read_adapters(path, lora: LoraConfig) -> dict:
    """The adapters of a LoRA checkpoint as float32 numpy arrays (they are small: read whole)."""
    import numpy as np

    reader = checkpoint.ParamsReader(path)
    adapters: dict = {}
    for name in lora.targets:
        key = target_path(name)[0]
        set_path(adapters, key, {k: np.asarray(reader.read((*key, k)), np.float32) for k in ("a", "b")})
    reader.verify()
    return adapters


class MergedReader:
    """A LoRA checkpoint read like a full one (`checkpoint.ParamsReader`'s `array` / `read`) on the
    host: the tensors of its base as training held them (rounded to `base_dtype`, an int8 base
    quantized per channel), with a b * alpha / rank added to each adapted weight."""

    def __init__(self, path, meta: CheckpointMeta):
        record = lora_of(meta, path)
        if not record.base_checkpoint:
            raise ConversionError(f"{path}: its adapters were trained on a random-init base (seed "
                                  f"{record.base_seed}), not on stored weights: there is no base to merge")
        self.lora = record.settings
        self.base = checkpoint.ParamsReader(record.base_checkpoint)
        self.adapters = read_adapters(path, self.lora)
        self.inputs = {("layers", *key): n_in for key, n_in in TARGETS.values()}  # layer matrices: input dims
        self.pairs = {target_path(name)[0]: name for name in self.lora.targets}

    def array(self, path: tuple[str, ...]):
        return self.base.array(path)

    def verify(self) -> None:
        """The base's tensors read whole against their fingerprints (the adapters were, when read)."""
        self.base.verify()

    def read(self, path: tuple[str, ...], index=None):
        import numpy as np

        w = self._as_trained(path, self.base.read(path, index), stacked=index is None)
        if path not in self.pairs:
            return w
        _, lead, _ = target_path(self.pairs[path])
        pair = get_path(self.adapters, path)
        a, b = (pair[k] if index is None else pair[k][None, index] for k in ("a", "b"))  # index: one layer
        rank = self.lora.rank
        delta = np.matmul(a.reshape(*a.shape[:lead], -1, rank), b.reshape(*b.shape[:lead], rank, -1))
        return w + delta.reshape(w.shape) * np.float32(self.lora.scale)

    def _as_trained(self, path, w, stacked: bool):
        import jax.numpy as jnp
        import ml_dtypes
        import numpy as np

        from lima_jax.model.lora import quantize

        if self.lora.base_dtype == "float32":
            return w.astype(np.float32)
        if self.lora.base_dtype == "int8" and path in self.inputs:
            q = quantize(jnp.asarray(w, jnp.float32) if stacked else jnp.asarray(w, jnp.float32)[None], self.inputs[path])
            return np.asarray(q.astype(jnp.float32)).reshape(w.shape)
        return w.astype(ml_dtypes.bfloat16).astype(np.float32)


def params_reader(path, meta: CheckpointMeta):
    """A checkpoint's full tensors on the host, one at a time; a LoRA checkpoint's merged into its base."""
    return checkpoint.ParamsReader(path) if meta.lora is None else MergedReader(path, meta)


# ---- a checkpoint as a model on devices ----

@dataclasses.dataclass
class LoadedModel:
    """A checkpoint ready to run. `params` are the model's weights on `mesh` (a LoRA checkpoint's
    adapters merged into its base), or with `merge_lora=False` the frozen base, with the
    adapters in `adapters`. `eot_id`: the model's, inferred (`eot_id`); `step`: the step read."""

    config: Any  # the effective ml-collections config
    model: ModelConfig
    params: dict
    adapters: dict | None
    tokenizer: Any
    meta: CheckpointMeta
    step: int
    path: Any  # the step folder read
    mesh: Any
    eot_id: int | None


def effective_config(meta: CheckpointMeta, config=None):
    """`config` if given, else the training config saved in the checkpoint, else the base config with
    the checkpoint's model config (a converted checkpoint)."""
    import ml_collections

    from lima_jax.config import base_config

    if config is not None:
        return config
    if meta.config:
        return ml_collections.ConfigDict(meta.config)
    config = base_config()
    config.model.update(dataclasses.asdict(meta.model))
    return config


def load_model(path, mesh=None, *, config=None, tokenizer_path: str | None = None, merge_lora: bool = True,
               mesh_overrides: dict | None = None, warn: Callable[[str], None] | None = None) -> LoadedModel:
    """A checkpoint (a training work dir, a checkpoint root: its latest step, or one step folder)
    as a model on `mesh` (default: `config.mesh`, with `mesh_overrides`). `config` defaults to
    the one saved in the checkpoint (`effective_config`); the model config comes from it, with no
    rematerialisation (a loaded model is not differentiated). The tokenizer: `choose_tokenizer`.
    A LoRA checkpoint's base is rebuilt as training held it (`frozen_base`) and its adapters are
    merged in (W + a b * alpha / rank, in the model's param_dtype) unless not `merge_lora`; a
    base that no longer holds the weights the adapters were trained on is refused (`check_base`).

    A damaged step (`checkpoint.newest_good`: fingerprints, non-finite values, unreadable) is
    passed over for the one before with a `warn`ing naming it, unless `path` names that step."""
    warn = warn or (lambda message: print(message, file=sys.stderr, flush=True))
    return checkpoint.newest_good(path, lambda step_dir: _load_step(step_dir, mesh, config, tokenizer_path, merge_lora,
                                                                     mesh_overrides), warn)


def _load_step(step_dir, mesh, config, tokenizer_path, merge_lora: bool, mesh_overrides) -> LoadedModel:
    """`load_model` of one step folder; its own damage raises DamagedCheckpoint (the caller falls
    back), a LoRA base's raises LoraBaseChanged (an older step would not help)."""
    import jax

    from lima_jax.config import model_config
    from lima_jax.model import abstract_params, lora as lora_lib, param_logical_axes
    from lima_jax.sharding import make_mesh, named_shardings

    meta = read_meta(step_dir)
    config = effective_config(meta, None if config is None else config.copy_and_resolve_references())
    if mesh_overrides:
        config.mesh.update(mesh_overrides)
    cfg = dataclasses.replace(model_config(config), remat_policy="none")
    tokenizer, _ = choose_tokenizer(dataclasses.replace(meta, model=cfg), step_dir, config=config,
                                    tokenizer_path=tokenizer_path)
    mesh = make_mesh(config.mesh) if mesh is None else mesh
    shardings = named_shardings(param_logical_axes(cfg), mesh)
    adapters = None
    if meta.lora is None:
        params = checkpoint.restore_params(step_dir, abstract_params(cfg), shardings)
    else:
        lora = meta.lora.settings
        adapters = checkpoint.restore_params(step_dir, lora_lib.abstract_adapters(cfg, lora),
                                             lora_lib.adapter_shardings(cfg, lora, mesh))
        if meta.lora.base_checkpoint:
            check_base(meta.lora, checkpoint.params_fingerprint(meta.lora.base_checkpoint), step_dir)
        try:
            params = frozen_base(meta.lora, cfg, mesh)
        except DamagedCheckpoint as e:
            raise LoraBaseChanged(f"{step_dir} holds LoRA adapters whose base is damaged: {e}") from e
        if merge_lora:
            merge = jax.jit(lambda base, a: lora_lib.merged(base, a, lora, cfg.weight_dtype), out_shardings=shardings,
                            donate_argnums=0)
            params, adapters = merge(params, adapters), None
    return LoadedModel(config, cfg, params, adapters, tokenizer, meta, int(step_dir.name), step_dir, mesh,
                       eot_id(meta, tokenizer))

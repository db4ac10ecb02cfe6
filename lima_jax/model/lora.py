"""LoRA: low-rank adapters trained beside a frozen base (Hu et al. 2021).

The adapters are their own parameter tree, `{"layers": {"attn": {"wq": {"a", "b"}, ...}}}`:
for a weight W [*in, *out] (stacked on `layers`), `a` [layers, *in, rank] and
`b` [layers, rank, *out], so the layer computes x W + (x a) b * alpha / rank, b starting at
zero (the adapted model starts as the base). Only this tree is differentiated and optimized.
The output head may be adapted too (target `head`, torchtune's `apply_lora_to_output`):
`{"lm_head": {"a" [dim, rank], "b" [rank, vocab]}}`, merged into the head before the loss.

`attach(base, adapters)` puts a `LoraWeight` (base weight, a, b, scale) where each targeted
weight was; the layers read it like an array and `dense` adds the low-rank term, so the model
code has one path for both. The frozen base may be stored in bfloat16 or in int8 with one
float32 scale per output channel (`QuantizedWeight`, dequantized as each layer reads it).

Adapter names and layouts map one to one onto PEFT's (lora_A [rank, in], lora_B [out, rank]:
`a.reshape(in, rank).T`, `b.reshape(rank, out).T`); see lima_jax.convert.lora_export.
"""

import dataclasses
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax.errors import ConfigError
from lima_jax.model.config import ModelConfig
from lima_jax.model.weights import LoraWeight, QuantizedWeight

# config name -> (module, weight) in the params tree, and the weight's input dims count.
TARGETS: dict[str, tuple[tuple[str, str], int]] = {
    "q": (("attn", "wq"), 1), "k": (("attn", "wk"), 1), "v": (("attn", "wv"), 1), "o": (("attn", "wo"), 2),
    "gate": (("mlp", "w1"), 1), "up": (("mlp", "w3"), 1), "down": (("mlp", "w2"), 1),
}
HEAD = "head"  # the output head [dim, vocab]: not stacked on layers, never quantized
TARGET_NAMES = (*TARGETS, HEAD)
# Hugging Face module names of the targets (PEFT's `target_modules`).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", HEAD: "lm_head"}
BASE_DTYPES = ("bfloat16", "float32", "int8")
QUANTIZED = tuple(path for path, _ in TARGETS.values())  # an int8 base stores every layer matrix quantized
RANK_AXIS = "lora_rank"
_DROPOUT_STREAM = zlib.crc32(b"lora_dropout")  # the adapters' dropout stream, apart from residual dropout's
INIT_STREAM = zlib.crc32(b"lora_init")  # the adapters' init key: fold_in(key(seed), INIT_STREAM)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGETS)  # the layer matrices; add HEAD for the output head
    base_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"config.lora.rank={self.rank!r}: a positive rank (0 turns LoRA off)")
        if not self.alpha > 0:
            raise ConfigError(f"config.lora.alpha={self.alpha!r}: must be > 0 (the update is scaled by alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config.lora.dropout={self.dropout!r}: must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGET_NAMES]
        if not self.targets or unknown or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"config.lora.targets={tuple(self.targets)!r}: distinct names among {TARGET_NAMES}")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"config.lora.base_dtype={self.base_dtype!r}; choose one of {BASE_DTYPES}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora_cfg: Mapping[str, Any] | None) -> "LoraConfig | None":
        """From `config.lora` (or a checkpoint's record of it); None when rank is 0 or absent."""
        if not lora_cfg or not lora_cfg.get("rank"):
            return None
        values = dict(lora_cfg)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config.lora keys: {unknown}")
        values["targets"] = tuple(values.get("targets", tuple(TARGETS)))
        return cls(**values)

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None) -> "LoraConfig | None":
        """From a LoRA checkpoint's `meta.lora` (which also names the base); None when absent."""
        if not record:
            return None
        return cls.from_config({f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})

    def to_dict(self) -> dict:
        return dict(dataclasses.asdict(self), targets=list(self.targets))


# ---- the adapter tree ----

def get_path(tree: dict, path: tuple[str, ...]):
    """tree[path[0]][path[1]]...: a leaf or subtree of a nested dict."""
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """tree[path[0]][path[1]]... = value, making the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def target_path(name: str) -> tuple[tuple[str, ...], int, int]:
    """(path in the params tree, leading stacked dims, input dims) of a target's weight."""
    if name == HEAD:
        return ("lm_head",), 0, 1
    path, n_in = TARGETS[name]
    return ("layers", *path), 1, n_in


def _split(name: str, dims: tuple) -> tuple[tuple, tuple]:
    """A weight's dims (sizes or logical names) -> its adapter's (a dims, b dims) around the rank."""
    _, lead, n_in = target_path(name)
    return (*dims[:lead + n_in], RANK_AXIS), (*dims[:lead], RANK_AXIS, *dims[lead + n_in:])


def adapter_shapes(cfg: ModelConfig, lora: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """target -> (a shape, b shape); a layer matrix's keep the leading layers axis."""
    from lima_jax.model.transformer import abstract_params  # the base's shapes, written once there

    if HEAD in lora.targets and cfg.tied_embeddings:
        raise ValueError("config.lora.targets includes 'head', but the model ties its output head to the embedding "
                         "(model.tied_embeddings): drop 'head' from config.lora.targets")
    base = abstract_params(cfg)
    out = {}
    for name in lora.targets:
        a, b = _split(name, get_path(base, target_path(name)[0]).shape)
        out[name] = tuple(tuple(lora.rank if d == RANK_AXIS else d for d in dims) for dims in (a, b))
    return out


def abstract_adapters(cfg: ModelConfig, lora: LoraConfig) -> dict:
    """ShapeDtypeStructs of the adapters, in the model's param_dtype (what the optimizer updates)."""
    tree: dict = {}
    for name, (a, b) in adapter_shapes(cfg, lora).items():
        set_path(tree, target_path(name)[0], {"a": jax.ShapeDtypeStruct(a, cfg.weight_dtype),
                                          "b": jax.ShapeDtypeStruct(b, cfg.weight_dtype)})
    return tree


def adapter_logical_axes(cfg: ModelConfig, lora: LoraConfig) -> dict:
    """Logical axes of the adapters: a weight's input axes then `lora_rank`, `lora_rank` then its
    output axes, so they shard by the base's rules; head_dim and mlp take the adapters' own rules
    (sharded over fsdp, where the base's embed axis is)."""
    from lima_jax.model.transformer import param_logical_axes

    base = param_logical_axes(cfg)
    own = {"head_dim": "lora_head_dim", "mlp": "lora_mlp", "vocab": "lora_vocab"}
    tree: dict = {}
    for name in lora.targets:
        path = target_path(name)[0]
        a, b = _split(name, tuple(own.get(n, n) for n in get_path(base, path)))
        set_path(tree, path, {"a": a, "b": b})
    return tree


def adapter_shardings(cfg: ModelConfig, lora: LoraConfig, mesh) -> dict:
    """NamedShardings of the adapters on `mesh` (fitted to their shapes: a small dim keeps only
    the mesh axes that divide it)."""
    from lima_jax.sharding import named_shardings

    return named_shardings(adapter_logical_axes(cfg, lora), mesh, abstract_adapters(cfg, lora))


def init_adapters(cfg: ModelConfig, lora: LoraConfig, key: jax.Array) -> dict:
    """a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default, Kaiming-uniform with a = sqrt(5)), b = 0."""
    tree: dict = {}
    for i, (name, (a, b)) in enumerate(adapter_shapes(cfg, lora).items()):
        path, lead, _ = target_path(name)
        bound = 1.0 / np.sqrt(np.prod(a[lead:-1]))
        a_init = jax.random.uniform(jax.random.fold_in(key, i), a, jnp.float32, -bound, bound)
        set_path(tree, path, {"a": a_init.astype(cfg.weight_dtype), "b": jnp.zeros(b, cfg.weight_dtype)})
    return tree


def attach(base: dict, adapters: dict, lora: LoraConfig, dropout_key: jax.Array | None = None) -> dict:
    """The base params with each adapted layer weight replaced by its LoraWeight (no copies). With
    a `dropout_key` (training) and `lora.dropout` > 0, every adapter of every layer draws its own
    mask. An adapted head is merged (W + a b * scale in float32, without dropout): the chunked
    loss reads the head as one matrix."""
    layers = {module: dict(weights) for module, weights in base["layers"].items()}
    out = dict(base, layers=layers)
    for i, name in enumerate(lora.targets):
        path = target_path(name)[0]
        pair = get_path(adapters, path)
        if name == HEAD:
            out["lm_head"] = base["lm_head"].astype(pair["a"].dtype) + pair["a"] @ pair["b"] * lora.scale
            continue
        keys = None
        if dropout_key is not None and lora.dropout > 0:
            n_layers = pair["a"].shape[0]
            keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(dropout_key, _DROPOUT_STREAM), i), n_layers)
        set_path(out, path, LoraWeight(get_path(out, path), pair["a"], pair["b"], keys, lora.scale, lora.dropout))
    return out


def merged(base: dict, adapters: dict, lora: LoraConfig, dtype) -> dict:
    """Plain params W + a b * scale in `dtype` (int8 weights dequantized), summed in float32."""
    params = jax.tree.map(lambda w: w.astype(dtype), base, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    for name in lora.targets:
        path, lead, _ = target_path(name)
        w, pair = get_path(base, path), get_path(adapters, path)
        a, b = (pair[k].astype(jnp.float32) for k in ("a", "b"))
        delta = jnp.matmul(a.reshape(*a.shape[:lead], -1, lora.rank), b.reshape(*b.shape[:lead], lora.rank, -1))
        set_path(params, path, (w.astype(jnp.float32) + delta.reshape(w.shape) * lora.scale).astype(dtype))
    return params


# ---- the frozen base ----

def quantize(w: jax.Array, n_in: int) -> QuantizedWeight:
    """Symmetric int8 with one scale per output channel of a stacked weight [layers, *in, *out]."""
    w32 = w.astype(jnp.float32)
    in_dims = tuple(range(1, 1 + n_in))
    scale = jnp.max(jnp.abs(w32), axis=in_dims, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel: any scale, values 0
    return QuantizedWeight(jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), scale)


def frozen_base(params: dict, lora: LoraConfig) -> dict:
    """Full params -> the base as LoRA training stores it: `base_dtype`, or int8 layer matrices
    (QuantizedWeight) with the rest in bfloat16."""
    if lora.base_dtype != "int8":
        return jax.tree.map(lambda w: w.astype(lora.base_dtype), params)
    out = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    for path, n_in in TARGETS.values():
        set_path(out["layers"], path, quantize(get_path(params["layers"], path), n_in))
    return out


def abstract_base(cfg: ModelConfig, lora: LoraConfig) -> dict:
    """ShapeDtypeStructs of the frozen base."""
    from lima_jax.model.transformer import abstract_params

    return jax.eval_shape(lambda p: frozen_base(p, lora), abstract_params(cfg))


def base_logical_axes(cfg: ModelConfig, lora: LoraConfig) -> dict:
    """The base's logical axes; an int8 weight's scale has no size on its input axes."""
    from lima_jax.model.transformer import param_logical_axes

    axes = param_logical_axes(cfg)
    if lora.base_dtype != "int8":
        return axes
    layers = {module: dict(weights) for module, weights in axes["layers"].items()}
    for path, n_in in TARGETS.values():
        names = tuple(get_path(layers, path))
        set_path(layers, path, QuantizedWeight(names, (names[0], *(None,) * n_in, *names[1 + n_in:])))
    return dict(axes, layers=layers)

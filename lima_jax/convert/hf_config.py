"""Hugging Face `config.json` <-> the model's architecture, in both directions, per family.

A family is a `model_type` and the ModelConfig switches it sets (`FAMILIES`): llama (Llama
1-3.x), mistral (read as LLaMA: no sliding window within the context), qwen2 (q/k/v biases)
and qwen3 (q/k norms, explicit head_dim). Reading accepts what transformers writes now (5.x:
`rope_parameters`) and wrote before (top-level `rope_theta`, `rope_scaling`), plus `head_dim`
and `tie_word_embeddings`. Anything the model does not implement is refused with the file and
the field named, never converted silently: a RoPE type other than default, llama3 and linear
(dynamic, yarn, ...), biases other than Qwen2's, an activation other than SiLU. A sliding
window is returned (`HFArch.sliding_window`) for the converter to check against the context.
"""

import dataclasses

from lima_jax.convert.errors import ConversionError
from lima_jax.model import ModelConfig

DEFAULT_THETA = 10000.0  # transformers' LlamaConfig default when a config names none
BOS_ID, EOS_ID = 1, 2  # LLaMA's SentencePiece ids
# model_type -> (architecture, ModelConfig switches the family always has)
FAMILIES = {"llama": ("LlamaForCausalLM", {}), "mistral": ("MistralForCausalLM", {}),
            "qwen2": ("Qwen2ForCausalLM", {"qkv_bias": True}), "qwen3": ("Qwen3ForCausalLM", {"qk_norm": True})}
# rope_type -> the rope_parameters it needs, as ModelConfig fields
ROPE_FIELDS = {"default": {}, "linear": {"factor": "rope_factor"},
               "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                          "high_freq_factor": "rope_high_freq_factor",
                          "original_max_position_embeddings": "rope_original_max_len"}}


@dataclasses.dataclass(frozen=True)
class HFArch:
    fields: dict  # ModelConfig architecture fields (sources.ARCH_KEYS and the family switches)
    sliding_window: int | None = None  # attention window the source applies; None: full attention


def read_hf_arch(c: dict, where: str) -> HFArch:
    """The architecture of a config.json dict of a supported family; `where` names the file in errors."""
    model_type = c.get("model_type", "llama")
    if model_type not in FAMILIES:
        raise ConversionError(f"{where}: model_type={model_type!r}; the converter reads {sorted(FAMILIES)}")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act={act!r}; the model implements LLaMA's 'silu' MLP only")
    for field in ("attention_bias", "mlp_bias"):  # qwen2's q/k/v biases are its family's, not this flag's
        if c.get(field) and model_type != "qwen2":
            raise ConversionError(f"{where}: {field}={c[field]!r}; the model has biases on q, k and v only "
                                  "(Qwen2's), so converting it would drop its biases")
    try:
        dim, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        fields = {"vocab_size": int(c["vocab_size"]), "dim": dim, "n_layers": int(c["num_hidden_layers"]),
                  "n_heads": n_heads, "n_kv_heads": int(c.get("num_key_value_heads") or n_heads),
                  "ffn_dim": int(c["intermediate_size"]), "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
                  "head_dim": int(c.get("head_dim") or dim // n_heads),
                  "tied_embeddings": bool(c.get("tie_word_embeddings", False)),
                  "qkv_bias": False, "qk_norm": False, **FAMILIES[model_type][1], **rope_fields(c, where)}
    except KeyError as e:
        raise ConversionError(f"{where} lacks {e.args[0]!r}") from None
    return HFArch(fields, sliding_window=sliding_window(c, model_type))


def sliding_window(c: dict, model_type: str) -> int | None:
    """The window the source's attention uses (Mistral's `sliding_window`; Qwen's only with
    `use_sliding_window` or sliding layers), None for full attention."""
    window = c.get("sliding_window")
    applies = model_type == "mistral" or c.get("use_sliding_window") or "sliding_attention" in (c.get("layer_types") or ())
    return int(window) if window and applies else None


def rope_fields(c: dict, where: str) -> dict:
    """ModelConfig's RoPE fields (rope_theta, rope_type and the scaling's) from `rope_parameters`
    (transformers 5) or top-level `rope_theta` and `rope_scaling` (before); a RoPE type the model
    does not implement is refused."""
    out: dict = {}
    for field in ("rope_parameters", "rope_scaling"):
        params = c.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConversionError(f"{where}: {field}={params!r} is not an object")
        kind = params.get("rope_type", params.get("type")) or "default"
        if kind not in ROPE_FIELDS:
            raise ConversionError(f"{where}: {field}.rope_type={kind!r}; the model implements RoPE types "
                                  f"{sorted(ROPE_FIELDS)} only, so converting it would change the model's outputs")
        if kind == "default" and out:
            continue  # rope_parameters' scaling wins over an unscaled old field
        try:
            scaling = {ours: (int if ours == "rope_original_max_len" else float)(params[theirs])
                       for theirs, ours in ROPE_FIELDS[kind].items()}
        except KeyError as e:
            raise ConversionError(f"{where}: {field} with rope_type={kind!r} lacks {e.args[0]!r}") from None
        if out and out != {"rope_type": kind, **scaling}:
            raise ConversionError(f"{where}: rope_parameters and rope_scaling disagree")
        out = {"rope_type": kind, **scaling}
    nested = (c.get("rope_parameters") or {}).get("rope_theta")
    top = c.get("rope_theta")
    if nested is not None and top is not None and float(nested) != float(top):
        raise ConversionError(f"{where}: rope_parameters.rope_theta={nested} and rope_theta={top} disagree")
    value = nested if nested is not None else top
    return {"rope_type": "default", **out, "rope_theta": DEFAULT_THETA if value is None else float(value)}


def rope_parameters(cfg: ModelConfig) -> dict:
    """transformers 5's `rope_parameters` of the model."""
    scaling = {theirs: getattr(cfg, ours) for theirs, ours in ROPE_FIELDS[cfg.rope_type].items()}
    return {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type, **scaling}


def model_type(cfg: ModelConfig) -> str:
    """The family an export is written as: qwen3 for q/k norms, qwen2 for q/k/v biases, else llama
    (Mistral without a window is LLaMA)."""
    if cfg.qk_norm and cfg.qkv_bias:
        raise ConversionError("a model with both q/k norms and q/k/v biases has no Hugging Face family to export to")
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def write_hf_config(cfg: ModelConfig, dtype: str, eot_id: int | None, bos_id: int | None = BOS_ID,
                    eos_id: int | None = EOS_ID) -> dict:
    """config.json for the model's family (`model_type`), in the layout transformers 5 writes
    (`rope_parameters`) and with the top-level `rope_theta` older readers look for. EOT, when
    there is one, ends generation next to EOS."""
    family = model_type(cfg)
    return {
        "architectures": [FAMILIES[family][0]], "model_type": family, "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_parameters(cfg), "max_position_embeddings": cfg.max_seq_len, "initializer_range": 0.02,
        "tie_word_embeddings": cfg.tied_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "use_cache": True, "sliding_window": None, "use_sliding_window": False,
        "bos_token_id": bos_id, "eos_token_id": stop_ids(eot_id, eos_id), "dtype": dtype,
    }


def stop_ids(eot_id: int | None, eos_id: int | None = EOS_ID) -> int | list[int] | None:
    """`eos_token_id` of the HF configs: EOS, and the end-of-turn token where the model has one."""
    if eot_id is None or eot_id == eos_id:
        return eos_id
    return [eot_id] if eos_id is None else [eos_id, eot_id]

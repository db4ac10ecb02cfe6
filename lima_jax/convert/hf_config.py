"""Hugging Face `config.json` <-> the model's architecture, in both directions.

Reading accepts what transformers writes now (5.x: `rope_parameters: {"rope_theta", "rope_type"}`)
and wrote before (top-level `rope_theta`, `rope_scaling`), plus `head_dim` and
`tie_word_embeddings`. Anything the model does not implement is refused with the file and the
field named, never converted silently: a RoPE type other than "default" (llama3, linear,
dynamic, yarn, ...), a `head_dim` other than hidden_size / num_attention_heads, an activation
other than SiLU. Tied embeddings are supported by copying the embedding into our separate
`lm_head` (`HFArch.tied`).
"""

import dataclasses

from lima_jax.convert.errors import ConversionError
from lima_jax.model import ModelConfig

DEFAULT_THETA = 10000.0  # transformers' LlamaConfig default when a config names none
BOS_ID, EOS_ID = 1, 2  # LLaMA's SentencePiece ids


@dataclasses.dataclass(frozen=True)
class HFArch:
    fields: dict  # ModelConfig architecture fields (ARCH_KEYS)
    tied: bool  # tie_word_embeddings: lm_head is the embedding (one tensor in the files)


def read_hf_arch(c: dict, where: str) -> HFArch:
    """The architecture of a LlamaForCausalLM config.json dict; `where` names the file in errors."""
    if c.get("model_type", "llama") != "llama":
        raise ConversionError(f"{where}: model_type={c.get('model_type')!r}, expected 'llama'")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{where}: hidden_act={act!r}; the model implements LLaMA's 'silu' MLP only")
    try:
        dim, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        fields = {"vocab_size": int(c["vocab_size"]), "dim": dim, "n_layers": int(c["num_hidden_layers"]),
                  "n_heads": n_heads, "n_kv_heads": int(c.get("num_key_value_heads") or n_heads),
                  "ffn_dim": int(c["intermediate_size"]), "norm_eps": float(c.get("rms_norm_eps", 1e-6)),
                  "rope_theta": rope_theta(c, where)}
    except KeyError as e:
        raise ConversionError(f"{where} lacks {e.args[0]!r}") from None
    head_dim = c.get("head_dim")
    if head_dim is not None and int(head_dim) != dim // n_heads:
        raise ConversionError(f"{where}: head_dim={head_dim}, but the model derives head_dim = hidden_size / "
                              f"num_attention_heads = {dim // n_heads}; such a model cannot be converted")
    return HFArch(fields, tied=bool(c.get("tie_word_embeddings", False)))


def rope_theta(c: dict, where: str) -> float:
    """The RoPE base from `rope_parameters` (transformers 5) or top-level `rope_theta` (before);
    refuses any RoPE scaling, in either field, since the model applies plain RoPE only."""
    for field in ("rope_parameters", "rope_scaling"):
        params = c.get(field)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ConversionError(f"{where}: {field}={params!r} is not an object")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise ConversionError(f"{where}: {field}.rope_type={kind!r}; the model implements plain RoPE only "
                                  "(rope_type 'default'), so converting it would change the model's outputs")
    nested = (c.get("rope_parameters") or {}).get("rope_theta")
    top = c.get("rope_theta")
    if nested is not None and top is not None and float(nested) != float(top):
        raise ConversionError(f"{where}: rope_parameters.rope_theta={nested} and rope_theta={top} disagree")
    value = nested if nested is not None else top
    return DEFAULT_THETA if value is None else float(value)


def write_hf_config(cfg: ModelConfig, dtype: str, eot_id: int | None, bos_id: int | None = BOS_ID,
                    eos_id: int | None = EOS_ID) -> dict:
    """config.json for LlamaForCausalLM, in the layout transformers 5 writes (`rope_parameters`)
    and with the top-level `rope_theta` older readers look for. EOT, when there is one, ends
    generation next to EOS."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": 0.02, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": stop_ids(eot_id, eos_id), "dtype": dtype,
    }


def stop_ids(eot_id: int | None, eos_id: int | None = EOS_ID) -> int | list[int] | None:
    """`eos_token_id` of the HF configs: EOS, and the end-of-turn token where the model has one."""
    if eot_id is None or eot_id == eos_id:
        return eos_id
    return [eot_id] if eos_id is None else [eos_id, eot_id]

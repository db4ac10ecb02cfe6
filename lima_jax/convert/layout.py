"""The one map between this model's parameters and Meta / Hugging Face tensor names.

Every converter (Meta reader, HF reader, HF writer) and the parity tests go through this
table (`layout(cfg)`: the entries a config's family switches include), so the layout is
written once. Our layout: `embed` [Vp, D], `lm_head` [D, Vp] (absent when tied; vocab
padded to a multiple of `vocab_multiple`), per-layer weights stacked on a leading `layers`
axis, q/k/v as [D, heads, head_dim] (Qwen2's biases [heads, head_dim], Qwen3's q/k norms
[head_dim]), `wo` as [heads, head_dim, D], MLP as [in, out].

RoPE: the model rotates halves (HF's convention). Meta checkpoints rotate interleaved pairs,
so Meta's wq/wk rows are permuted once here, exactly as Hugging Face's own converter does.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from lima_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    path: tuple[str, ...]  # where it lives in our params dict
    hf: str  # Hugging Face name; `{i}` is the layer index
    meta: str  # Meta name
    meta_split_dim: int | None  # dim Meta's model-parallel files split it on; None = replicated
    to_ours: Callable[[np.ndarray, ModelConfig], np.ndarray]  # from HF's [out, in] layout
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    hf_shape: Callable[[ModelConfig], tuple[int, ...]] = lambda c: ()  # one tensor (one layer) as HF stores it
    rope_heads: str | None = None  # "n_heads" / "n_kv_heads" for Meta's q/k permutation
    vocab_rows: bool = False  # rows are vocabulary entries (EOT growth, padding, trimming)
    present: Callable[[ModelConfig], bool] = lambda c: True  # whether a model of this config has it

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_name(self, i: int | None = None) -> str:
        return self.hf.format(i=i)

    def meta_name(self, i: int | None = None) -> str:
        return self.meta.format(i=i)

    def layers(self, cfg: ModelConfig) -> tuple[int | None, ...]:
        """The layer indices this entry covers (`(None,)` for a tensor outside the stack)."""
        return tuple(range(cfg.n_layers)) if self.per_layer else (None,)

    def meta_to_hf(self, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """A merged Meta tensor -> HF's layout (only q/k rows differ: the RoPE permutation)."""
        return meta_to_hf_rope(w, getattr(cfg, self.rope_heads)) if self.rope_heads else w

    def hf_to_meta(self, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        return hf_to_meta_rope(w, getattr(cfg, self.rope_heads)) if self.rope_heads else w


def _pad_vocab(w, cfg):
    rows = cfg.padded_vocab_size - w.shape[0]
    if rows < 0:
        raise ValueError(f"checkpoint has {w.shape[0]} vocabulary rows, more than the config's {cfg.padded_vocab_size}")
    return np.pad(w, ((0, rows), (0, 0))) if rows else w


def _heads_in(n):  # HF [n*hd, D] -> ours [D, n, hd]
    return lambda w, c: w.T.reshape(c.dim, getattr(c, n), c.head_dim)


def _heads_out(n):  # ours [D, n, hd] -> HF [n*hd, D]
    return lambda w, c: w.reshape(c.dim, getattr(c, n) * c.head_dim).T


def _transpose(w, c):
    return w.T


def _same(w, c):
    return w


def _bias_in(n):  # HF [n*hd] -> ours [n, hd]
    return lambda w, c: w.reshape(getattr(c, n), c.head_dim)


def _flat(w, c):
    return w.reshape(-1)


def _bias(name: str, heads: str) -> Tensor:
    return Tensor(("layers", "attn", f"{name}_bias"), f"model.layers.{{i}}.self_attn.{name}_proj.bias", "", None,
                  _bias_in(heads), _flat, hf_shape=lambda c: (getattr(c, heads) * c.head_dim,),
                  present=lambda c: c.qkv_bias)


def _qk_norm(name: str) -> Tensor:
    return Tensor(("layers", "attn", f"{name}_norm", "scale"), f"model.layers.{{i}}.self_attn.{name}_norm.weight", "",
                  None, _same, _same, hf_shape=lambda c: (c.head_dim,), present=lambda c: c.qk_norm)


_D = lambda c: (c.dim,)  # noqa: E731
_VD = lambda c: (c.vocab_size, c.dim)  # noqa: E731

LAYOUT: tuple[Tensor, ...] = (
    Tensor(("embed",), "model.embed_tokens.weight", "tok_embeddings.weight", 1,
           lambda w, c: _pad_vocab(w, c), lambda w, c: w[: c.vocab_size], hf_shape=_VD, vocab_rows=True),
    Tensor(("final_norm", "scale"), "model.norm.weight", "norm.weight", None, _same, _same, hf_shape=_D),
    Tensor(("lm_head",), "lm_head.weight", "output.weight", 0,
           lambda w, c: _pad_vocab(w, c).T, lambda w, c: w.T[: c.vocab_size], hf_shape=_VD, vocab_rows=True,
           present=lambda c: not c.tied_embeddings),
    Tensor(("layers", "attn_norm", "scale"), "model.layers.{i}.input_layernorm.weight",
           "layers.{i}.attention_norm.weight", None, _same, _same, hf_shape=_D),
    Tensor(("layers", "attn", "wq"), "model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", 0,
           _heads_in("n_heads"), _heads_out("n_heads"), hf_shape=lambda c: (c.n_heads * c.head_dim, c.dim),
           rope_heads="n_heads"),
    Tensor(("layers", "attn", "wk"), "model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", 0,
           _heads_in("n_kv_heads"), _heads_out("n_kv_heads"), hf_shape=lambda c: (c.n_kv_heads * c.head_dim, c.dim),
           rope_heads="n_kv_heads"),
    Tensor(("layers", "attn", "wv"), "model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", 0,
           _heads_in("n_kv_heads"), _heads_out("n_kv_heads"), hf_shape=lambda c: (c.n_kv_heads * c.head_dim, c.dim)),
    _bias("q", "n_heads"), _bias("k", "n_kv_heads"), _bias("v", "n_kv_heads"), _qk_norm("q"), _qk_norm("k"),
    Tensor(("layers", "attn", "wo"), "model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", 1,
           lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.dim),
           lambda w, c: w.reshape(c.n_heads * c.head_dim, c.dim).T, hf_shape=lambda c: (c.dim, c.n_heads * c.head_dim)),
    Tensor(("layers", "mlp_norm", "scale"), "model.layers.{i}.post_attention_layernorm.weight",
           "layers.{i}.ffn_norm.weight", None, _same, _same, hf_shape=_D),
    Tensor(("layers", "mlp", "w1"), "model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", 0,
           _transpose, _transpose, hf_shape=lambda c: (c.ffn_dim, c.dim)),
    Tensor(("layers", "mlp", "w3"), "model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", 0,
           _transpose, _transpose, hf_shape=lambda c: (c.ffn_dim, c.dim)),
    Tensor(("layers", "mlp", "w2"), "model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", 1,
           _transpose, _transpose, hf_shape=lambda c: (c.dim, c.ffn_dim)),
)



def layout(cfg: ModelConfig) -> tuple[Tensor, ...]:
    """The LAYOUT entries a model of `cfg` has (biases, q/k norms and an untied head per its switches)."""
    return tuple(t for t in LAYOUT if t.present(cfg))


# Tensors some releases carry that the model does not use (LLaMA-1's precomputed RoPE table;
# HF's cached rotary inverse frequencies in old exports). Anything else unknown is an error.
IGNORED_META = ("rope.freqs",)
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


def meta_to_hf_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's interleaved-pair rows of wq/wk -> HF's rotate-half rows (per head)."""
    out_dim, d = w.shape
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, d).transpose(0, 2, 1, 3).reshape(out_dim, d)


def hf_to_meta_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    out_dim, d = w.shape
    return w.reshape(n_heads, 2, out_dim // n_heads // 2, d).transpose(0, 2, 1, 3).reshape(out_dim, d)


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def params_from_hf(state_dict, cfg: ModelConfig, dtype=np.float32) -> dict:
    """Our params dict from an in-memory HF state dict of numpy arrays (tests, small models).

    The streaming converter uses the same LAYOUT one tensor at a time instead."""
    params: dict = {}
    for t in layout(cfg):
        if t.per_layer:
            value = np.stack([t.to_ours(np.asarray(state_dict[t.hf.format(i=i)]), cfg) for i in range(cfg.n_layers)])
        else:
            value = t.to_ours(np.asarray(state_dict[t.hf]), cfg)
        set_path(params, t.path, value.astype(dtype))
    return params


def mean_row(w: np.ndarray) -> np.ndarray:
    """The mean of `w`'s rows, accumulated in float64 (no float64 copy of `w`), in `w`'s dtype."""
    return w.mean(axis=0, dtype=np.float64).astype(w.dtype)


def ffn_dim_meta(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """The MLP width Meta's `FeedForward` derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

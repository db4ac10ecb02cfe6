"""The LLaMA decoder: embedding, a scanned stack of blocks, final norm, output head (its own
matrix, or the embedding's transpose with `tied_embeddings`).

Why Flax NNX: it is what current Flax recommends for new code, modules are plain Python
objects (easy to read, like nanoGPT), and `nnx.split` / `nnx.merge` give a pure
(graphdef, params) pair, so the train step stays a pure function of a dict of arrays that
Orbax, optax and the converter handle directly. Layers are created with `nnx.vmap`, which
stacks every block parameter along a leading `layers` axis, and run with `jax.lax.scan`
under `jax.checkpoint`, so compile time does not grow with depth.
"""

import functools
import operator
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from lima_jax.model.attention import AttentionMask
from lima_jax.model.config import ModelConfig
from lima_jax.model.dense import dense
from lima_jax.model.kv_cache import Cache, LayerCache, Layout, write_rows
from lima_jax.model.layers import MLP, Attention, RMSNorm, param, rope_tables
from lima_jax.sharding import constrain

Carry = TypeVar("Carry")

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep the outputs of the weight matmuls, recompute attention and elementwise work
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: AttentionMask, dropout_rate: jax.Array,
                 dropout_key: jax.Array | None, cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        h, cache = self.attn(self.attn_norm(x), rope, mask, cache)
        x = constrain(x + residual_dropout(h, dropout_rate, dropout_key, 0), "batch", "length", "act_embed")
        h = self.mlp(self.mlp_norm(x))
        x = constrain(x + residual_dropout(h, dropout_rate, dropout_key, 1), "batch", "length", "act_embed")
        return x, cache


def residual_dropout(x: jax.Array, rate: jax.Array, key: jax.Array | None, stream: int) -> jax.Array:
    """LIMA's dropout on a sublayer's output before the residual add (rate may be traced)."""
    if key is None:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, stream), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))


def layer_stack(layer: Callable[[Carry, Any], Carry], carry: Carry, xs: Any, scan: bool) -> Carry:
    """`carry` through `layer(carry, xs[i])` for each i along the leading axis of `xs`'s leaves:
    one `lax.scan` (compiled once whatever the depth), or unrolled (a little faster for small
    models on CPU; compile time grows with depth)."""
    if scan:
        return jax.lax.scan(lambda c, x: (layer(c, x), None), carry, xs)[0]
    for i in range(jax.tree.leaves(xs)[0].shape[0]):
        carry = layer(carry, jax.tree.map(operator.itemgetter(i), xs))
    return carry


class Llama(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        vp, d, pd = cfg.padded_vocab_size, cfg.dim, cfg.weight_dtype
        self.embed = param(rngs, (vp, d), ("vocab", "embed"), pd)

        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(layer_rngs):
            return Block(cfg, layer_rngs)

        self.layers = make_layers(rngs.split(cfg.n_layers))
        self.final_norm = RMSNorm(cfg, rngs)
        if not cfg.tied_embeddings:
            self.lm_head = param(rngs, (d, vp), ("embed", "vocab"), pd)

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               dropout_key: jax.Array | None = None, cache: Cache | None = None,
               cache_index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        """Final-norm hidden states [B, S, D] (and the updated cache, or None).

        tokens, positions, segment_ids: [B, S] int32. Packed rows restart `positions` at 0 for
        each example and give each example its own segment id; id 0 marks padding. Tokens
        attend causally within their own segment only.
        cache: None for training, else {"k", "v": [L, B, T, KV, D] or [L, B, KV, T, D] (the
        layout of kv_cache.Layout.of(cfg)), "segment_ids": [B, T]} with the S new tokens
        written at slot `cache_index` [B] of each row (see kv_cache).
        dropout_key: None for eval (no dropout).
        """
        cfg = self.cfg
        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype), "batch", "length", "act_embed")
        # positions < max_seq_len in training; a sampler may run past it (it warns), up to its cache
        longest = max(cfg.max_seq_len, tokens.shape[1], 0 if cache is None else cache["segment_ids"].shape[1])
        rope = rope_tables(positions, cfg, longest)
        if cache is None:
            x, _ = self._blocks(x, rope, AttentionMask.packed(segment_ids), dropout_key)
            return self.final_norm(x), None
        cache_segments = write_rows(cache["segment_ids"], segment_ids, cache_index)
        mask = AttentionMask.over_cache(segment_ids, cache_segments, cache_index)
        x, (k, v) = self._blocks(x, rope, mask, dropout_key, (cache["k"], cache["v"]), cache_index)
        return self.final_norm(x), {"k": k, "v": v, "segment_ids": cache_segments}

    def _blocks(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], mask: AttentionMask,
                dropout_key: jax.Array | None, kv: tuple[jax.Array, jax.Array] | None = None,
                cache_index: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x through every block: (x, the whole cache's updated (k, v), or None without a cache).
        The cache rides in the carry and each layer writes its slice in place; as scan xs/ys
        it would be copied whole at every layer."""
        cfg = self.cfg
        if cfg.residual_dropout == 0:
            dropout_key = None  # rate 0 in every layer: do not draw [B, S, D] random masks for nothing
        n = cfg.n_layers
        rates = cfg.residual_dropout * jnp.arange(n, dtype=jnp.float32) / max(n - 1, 1)
        graphdef, stacked = nnx.split(self.layers)
        layout = Layout.of(cfg)

        def layer(carry, xs):
            x, kv = carry
            params, rate, index = xs
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            cache = None if kv is None else LayerCache(*kv, layer=index, index=cache_index, layout=layout)
            x, cache = nnx.merge(graphdef, params)(x, rope, mask, rate.astype(x.dtype), key, cache)
            return x, None if cache is None else (cache.k, cache.v)

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=REMAT[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        return layer_stack(layer, (x, kv), (stacked, rates, jnp.arange(n)), cfg.scan_layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[..., D] -> [..., padded vocab] in float32; padding rows of the vocab get -inf-like."""
        head = self.embed[...].T if self.cfg.tied_embeddings else self.lm_head[...]
        return output_logits(self.cfg, head, hidden)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits for unpacked rows (positions 0.., one segment) unless given; for tests and eval."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        return self.logits(self.hidden(tokens, positions, segment_ids, dropout_key)[0])


def head_weight(cfg: ModelConfig, params: dict) -> jax.Array:
    """The output head [D, Vp] of a params dict: `lm_head`, or the embedding's transpose when tied
    (gradients through it reach the one embedding)."""
    return params["embed"].T if cfg.tied_embeddings else params["lm_head"]


def output_logits(cfg: ModelConfig, lm_head: jax.Array, hidden: jax.Array) -> jax.Array:
    """The output head as a function of its weight [D, Vp] (the loss differentiates it per chunk)."""
    logits = dense(hidden, lm_head.astype(cfg.compute_dtype), transposed_wgrad=cfg.transposed_wgrad,
                   out_dtype=jnp.float32)
    if cfg.padded_vocab_size != cfg.vocab_size:
        real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
        logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
    return logits


# ---- the functional view: params are a plain nested dict of arrays -------------------------

@functools.cache
def _skeleton(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Llama(cfg, nnx.Rngs(0))))


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random parameters (jit this with out_shardings=param_shardings to create them sharded)."""
    return nnx.to_pure_dict(nnx.split(Llama(cfg, nnx.Rngs(params=key)))[1])


def abstract_params(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the parameters, without allocating anything."""
    return nnx.to_pure_dict(_skeleton(cfg)[1])


def param_logical_axes(cfg: ModelConfig) -> dict:
    """The logical axis names of every parameter, as PartitionSpecs of names."""
    return nnx.to_pure_dict(nnx.get_partition_spec(_skeleton(cfg)[1]))


def bind(cfg: ModelConfig, params: dict) -> Llama:
    """The module over given parameters (cheap: no copies), to call `.hidden` / `.logits`."""
    return nnx.merge(_skeleton(cfg)[0], params)

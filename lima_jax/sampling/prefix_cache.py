"""The prefix cache: keys and values of prompt blocks already prefilled, reused by later prompts
that start with the same tokens, so their prefill feeds only the rest.

- **Blocks.** A prompt's first P - 1 tokens (those the prefill writes; decode.insert) are cut
  into blocks of BLOCK tokens. A full block is keyed by a hash of its tokens chained with its
  prefix's key, so one key stands for the whole prefix up to the block's end: equal keys, equal
  keys and values (a token's K and V depend on it and the tokens before it only).
- **The pool** on the devices: {"k", "v": [L, N, BLOCK, KV, D]} (or [L, N, KV, BLOCK, D]), the
  slots' cache layout (model.kv_cache.Layout) cut into N pages of BLOCK positions. N is the
  memory budget (`--prefix_cache_mib`) over one block's bytes; the host index (`PrefixCache`)
  maps keys to pages, least recently used first out when the pool is full.
- **A prefill with a cached prefix** (`insert_cached`): a row's longest run of cached blocks
  is gathered from the pool into its row cache at positions 0 .. p - 1, and only tokens p ..
  P - 1 are fed; they attend to the gathered prefix through the same over-cache mask as a
  decode step (decode.prefill_rows). The filled row is then written into the slot as any
  prefill. Afterwards the prompt's full blocks not yet cached are copied from the slot's
  cache into pages (`store_blocks`). A page is copied out when gathered, so evicting it later
  never touches a request in flight: nothing is pinned.
- **A paged kernel later.** The pool is a page table's pages already, and each row's run of
  block ids its page table. A paged attention kernel (e.g. the Pallas TPU ragged paged
  attention) can take (pool, block ids) instead of the gathered copy: the slots' cache then
  becomes pages of the same pool, `insert_cached` hands the kernel the block table instead of
  gathering, and `store_blocks` turns into bookkeeping (a prefilled block is already a page).
  The host index, keys and eviction stay as they are.

Every process of a multi-host mesh runs the same index on the same requests in the same order,
so all choose the same pages.
"""

import collections
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax.errors import ConfigError
from lima_jax.model import ModelConfig
from lima_jax.model.kv_cache import Layout
from lima_jax.sampling.decode import PROMPT_BUCKET, constrain_cache, insert, prefill_rows
from lima_jax.sharding import constrain

BLOCK = 16  # tokens a block: the reuse granularity (a prompt's last partial block is always fed)
MiB = 1 << 20


def block_bytes(cfg: ModelConfig) -> int:
    """Device bytes of one block: keys and values of BLOCK positions in every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * BLOCK * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def pool_axes(layout: Layout) -> tuple:
    """The pool's logical axis names: the cache's, with pages and their positions unsharded."""
    return layout.axes(batch=None, length=None)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_pool(cfg: ModelConfig, num_blocks: int) -> dict:
    layout = Layout.of(cfg)
    shape = layout.shape(cfg, num_blocks, BLOCK)
    return {name: constrain(jnp.zeros(shape, cfg.compute_dtype), *pool_axes(layout)) for name in ("k", "v")}


def gather_prefix(cfg: ModelConfig, pool: dict, blocks: jax.Array, start: jax.Array, width: int) -> dict:
    """A row cache of `width` positions holding blocks [M, nb] of the pool at 0 .. nb * BLOCK - 1,
    attendable (segment 1) up to each row's `start` [M]; the rest is the fed tokens' room."""
    layout = Layout.of(cfg)
    m, nb = blocks.shape
    time = layout.time_axis
    padding = [(0, 0)] * 5
    padding[time] = (0, width - nb * BLOCK)

    def rows(pages):  # the pool's pages -> a cache of M rows, `width` positions
        got = jnp.moveaxis(pages[:, blocks], 2, time)  # [L, M, nb, ...]: nb next to BLOCK, to merge
        return jnp.pad(got.reshape(layout.shape(cfg, m, nb * BLOCK)), padding)

    segments = (jnp.arange(width)[None, :] < start[:, None]).astype(jnp.int32)
    return constrain_cache(cfg, {"k": rows(pool["k"]), "v": rows(pool["v"]), "segment_ids": segments})


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def insert_cached(cfg: ModelConfig, params: dict, state: dict, pool: dict, new: dict) -> dict:
    """decode.insert for prompts whose first new["start"] [M] tokens (whole blocks, the pool's
    new["blocks"] [M, nb]) are cached: new["suffix"] [M, S] holds tokens start .. start + S - 1
    of each prompt, the rest of `new` is insert's (the whole prompt in "tokens", for the
    repetition penalty and the last token)."""
    width = new["blocks"].shape[1] * BLOCK + new["suffix"].shape[1]
    row_cache = gather_prefix(cfg, pool, new["blocks"], new["start"], width)
    return prefill_rows(cfg, params, state, new, new["suffix"], new["start"], row_cache)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("pool",))
def store_blocks(cfg: ModelConfig, pool: dict, cache: dict, slot: jax.Array, start: jax.Array,
                 page: jax.Array) -> dict:
    """Copy BLOCK positions from start[n] of slot slot[n]'s cache into page page[n] of the pool
    (page N: a filler row, dropped)."""
    layout = Layout.of(cfg)

    def take(c):  # the cache [L, B, ...] -> n pages [L, n, ...] of BLOCK positions
        one = lambda s, t: jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(c, s, 1, keepdims=False),  # noqa: E731
                                                        t, BLOCK, axis=layout.time_axis - 1)
        return jax.vmap(one, out_axes=1)(slot, start)

    return {name: constrain(pool[name].at[:, page].set(take(cache[name]), mode="drop"), *pool_axes(layout))
            for name in ("k", "v")}


class PrefixCache:
    """The host index over a pool of `budget_bytes` (whole blocks): which pages hold which
    prefix blocks, least recently used first out. `hits` / `misses` count blocks: a prompt's
    full blocks found cached, and those prefilled (then stored)."""

    def __init__(self, cfg: ModelConfig, budget_bytes: int):
        self.cfg, self.budget_bytes = cfg, int(budget_bytes)
        self.block_bytes = block_bytes(cfg)
        self.num_blocks = self.budget_bytes // self.block_bytes
        if self.num_blocks < 1:
            raise ConfigError(f"--prefix_cache_mib: a prefix cache of {self.budget_bytes} bytes holds no block: one "
                              f"block of {BLOCK} tokens takes {self.block_bytes} bytes for this model")
        self.hits = self.misses = 0
        self.reset()

    def reset(self) -> None:
        """Empty (the pool is allocated by `allocate`, on the caller's mesh)."""
        self.pages: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> page, LRU first
        self.unused = list(range(self.num_blocks))
        self.pool: dict | None = None

    def allocate(self) -> None:
        if self.pool is None:
            self.pool = init_pool(self.cfg, self.num_blocks)

    @staticmethod
    def keys(prompt) -> list[bytes]:
        """The chained keys of the full blocks among a prompt's first P - 1 tokens."""
        keys, key = [], b""
        tokens = np.asarray(prompt, np.int64)
        for end in range(BLOCK, len(tokens), BLOCK):  # end < P: the block lies within tokens 0 .. P - 2
            key = hashlib.blake2b(key + tokens[end - BLOCK:end].tobytes(), digest_size=16).digest()
            keys.append(key)
        return keys

    def lookup(self, keys: list[bytes]) -> list[int]:
        """Pages of the longest cached run of `keys` from the first (changes nothing: see `use`)."""
        found = []
        for key in keys:
            if key not in self.pages:
                break
            found.append(self.pages[key])
        return found

    def use(self, keys: list[bytes], used: int) -> None:
        """Count a prompt's blocks (`used` of `keys` read from the pool) and make the used ones
        the most recently used, the deepest least, so a chain is evicted from its end."""
        for key in reversed(keys[:used]):
            self.pages.move_to_end(key)
        self.hits += used
        self.misses += len(keys) - used

    def claim(self, keys: list[bytes], cached: int, taken: set[int]) -> list[tuple[int, int]]:
        """Pages for keys[cached:] (those not cached yet): [(block index, page)], taking unused
        pages, then the least recently used one not in `taken` (the pages this admission writes
        already, which it adds to); keys already claimed are skipped, and a chain stops at the
        first key that finds no page (the rest could never be looked up)."""
        out = []
        for i in range(cached, len(keys)):
            if keys[i] in self.pages:
                continue
            if self.unused:
                page = self.unused.pop()
            else:
                old = next((k for k, p in self.pages.items() if p not in taken), None)
                if old is None:
                    break
                page = self.pages.pop(old)
            self.pages[keys[i]] = page
            taken.add(page)
            out.append((i, page))
        for key in reversed(keys[cached:]):  # the chain's head most recently used, as in lookup
            if key in self.pages:
                self.pages.move_to_end(key)
        return out

    def prefill(self, cfg: ModelConfig, params: dict, state: dict, new: dict, prompts: list, slots: list[int],
                length: int) -> tuple[dict, int, int]:
        """Decoder's prefill of `prompts` (rows 0 .. len(prompts) - 1 of insert's `new`) into `slots`
        over the prefix cache: each row's cached blocks are gathered and the rest fed, then its new
        full blocks stored. Returns (the new state, tokens fed a row, cache positions a row)."""
        keys = [self.keys(p) for p in prompts]
        found = [self.lookup(k) for k in keys]
        bucket = lambda n: -(-n // PROMPT_BUCKET) * PROMPT_BUCKET  # noqa: E731  few shapes compile
        rows, width = new["tokens"].shape
        prefix = bucket(max((len(f) for f in found), default=0) * BLOCK)
        fed = bucket(max((len(p) - len(f) * BLOCK for p, f in zip(prompts, found)), default=1))
        if prefix == 0 or prefix + fed > length:  # nothing cached, or no room for a row cache of both: feed it all
            found = [[] for _ in prompts]
            state = insert(cfg, params, state, new)
            fed = positions = width
        else:
            new = dict(new, start=np.zeros(rows, np.int32), suffix=np.zeros((rows, fed), np.int32),
                       blocks=np.zeros((rows, prefix // BLOCK), np.int32))
            for row, (prompt, pages) in enumerate(zip(prompts, found)):
                start = len(pages) * BLOCK
                new["start"][row], new["blocks"][row, :len(pages)] = start, pages
                new["suffix"][row, :len(prompt) - start] = prompt[start:]
            state = insert_cached(cfg, params, state, self.pool, new)
            positions = prefix + fed
        taken = {page for pages in found for page in pages}  # an admission never evicts what it reads or writes
        copies = []
        for row_keys, pages, slot in zip(keys, found, slots):
            self.use(row_keys, len(pages))
            copies += [(slot, i * BLOCK, page) for i, page in self.claim(row_keys, len(pages), taken)]
        if copies:
            n = 1 << (len(copies) - 1).bit_length()  # a power of two: few shapes compile
            copies += [(0, 0, self.num_blocks)] * (n - len(copies))  # page N: dropped
            slot_ids, starts, pages = (np.asarray(c, np.int32) for c in zip(*copies))
            self.pool = store_blocks(cfg, self.pool, state["cache"], slot_ids, starts, pages)
        return state, fed, positions

    def stats(self) -> dict:
        used = len(self.pages)
        return {"hits": self.hits, "misses": self.misses, "blocks_used": used, "bytes_used": used * self.block_bytes,
                "budget_bytes": self.num_blocks * self.block_bytes, "block_tokens": BLOCK}


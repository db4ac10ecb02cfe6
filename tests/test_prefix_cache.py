"""The prefix cache: prompts that share a prefix get the same tokens with the cache as without
it (greedy ones also as transformers' generate), while feeding fewer tokens; the host index
evicts least recently used blocks from a chain's end."""

import dataclasses

import jax
import numpy as np

from lima_jax.sampling.decode import Request
from lima_jax.sampling.prefix_cache import BLOCK, PrefixCache, block_bytes
from tests.references import MODEL_GQA, hf_params
from tests.test_sampling import hf_greedy, hf_model, sampler

jax.config.update("jax_default_matmul_precision", "highest")

CFG = dataclasses.replace(MODEL_GQA, max_seq_len=160)
NEW = 8


def requests(seed: int = 0) -> list[list[Request]]:
    """Three waves: one prompt that fills the cache, then prompts sharing 2-3 of its blocks (and
    one sharing none) with greedy and seeded decoding, then one that repeats the first whole."""
    rng = np.random.default_rng(seed)
    shared = rng.integers(3, CFG.vocab_size, 3 * BLOCK + 5).tolist()
    tail = lambda n: rng.integers(3, CFG.vocab_size, n).tolist()  # noqa: E731
    greedy = dict(greedy=True, repetition_penalty=1.0)
    first = [Request(tuple(shared + tail(7)), NEW, **greedy)]
    second = [Request(tuple(shared[:2 * BLOCK + 3] + tail(20)), NEW, **greedy),
              Request(tuple(shared + tail(1)), NEW, temperature=0.9, top_p=0.9, repetition_penalty=1.2, seed=5),
              Request(tuple(shared[:3 * BLOCK] + tail(40)), NEW, **greedy),
              Request(tuple(tail(30)), NEW, **greedy)]
    return [first, second, [first[0]]]


def run(decoder, waves) -> list[list[int]]:
    """Each wave admitted at once and decoded to its end; the answers in request order."""
    answers, index = {}, 0
    for wave in waves:
        decoder.admit([(index + i, r) for i, r in enumerate(wave)])
        index += len(wave)
        while decoder.active:
            for _, tag, token, _ in decoder.step()[1]:
                answers.setdefault(tag, []).append(token)
    return [answers[i] for i in range(index)]


def test_prefix_cache_gives_the_same_tokens_and_feeds_fewer(kv_position_major):
    """In both KV cache layouts: the pool's pages are the slots' layout (model.kv_cache.Layout)."""
    cfg = dataclasses.replace(CFG, kv_position_major=kv_position_major)
    hf = hf_model(cfg, seed=1)
    model = sampler(cfg, hf_params(hf, cfg))
    waves = requests()
    plain, cached = model.decoder(4), model.decoder(4, prefix_cache_bytes=64 * block_bytes(cfg))
    expected, got = run(plain, waves), run(cached, waves)
    assert got == expected
    flat = [r for wave in waves for r in wave]
    for request, answer in zip(flat, got):
        if request.greedy:
            assert answer == hf_greedy(hf, list(request.prompt), NEW)
    stats = cached.prefix_cache.stats()
    assert stats["hits"] == 2 + 3 + 3 + 3  # blocks read: rows of wave 2 (the last shares none), wave 3
    assert stats["blocks_used"] == 3 + 1 + 2 + 1  # the first prompt's, then wave 2's new full blocks
    assert cached.prefill_stats["tokens_fed"] < plain.prefill_stats["tokens_fed"]
    assert cached.prefill_stats["flops"] < plain.prefill_stats["flops"]


def test_a_small_cache_evicts_and_answers_stay_the_same():
    hf = hf_model(CFG, seed=2)
    model = sampler(CFG, hf_params(hf, CFG))
    waves = requests(seed=3)
    cached = model.decoder(4, prefix_cache_bytes=3 * block_bytes(CFG))  # 3 blocks: waves evict
    assert run(cached, waves) == run(model.decoder(4), waves)
    assert cached.prefix_cache.stats()["blocks_used"] == 3


def test_eviction_takes_a_chains_end_first():
    cache = PrefixCache(CFG, 3 * block_bytes(CFG))
    a, b = (PrefixCache.keys(list(range(s, s + 2 * BLOCK + 1))) for s in (0, 100))
    assert len(a) == 2 and cache.lookup(a) == []
    cache.claim(a, 0, set())
    cache.use(b, 0)
    cache.claim(b, 0, set())  # one unused page, then the least recently used: a's second block
    assert len(cache.lookup(a)) == 1 and len(cache.lookup(b)) == 2
    taken = set(cache.lookup(a) + cache.lookup(b))  # read or written by this admission: not evicted
    assert cache.claim(a, 1, taken) == [] and len(cache.lookup(a)) == 1

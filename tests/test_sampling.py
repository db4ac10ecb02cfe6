"""KV-cache decoding against full recomputation and transformers; transforms against HF's processors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from lima_jax.model import bind, param_logical_axes
from lima_jax.sampling import SamplingSettings, generate, next_token, repetition_penalty, temperature, top_k, top_p
from lima_jax.sharding import logical_to_spec, make_mesh, named_shardings
from tests.references import MODEL_GQA as GQA, MODEL_MHA as MHA, hf_model as hf_model_small_init, hf_params

jax.config.update("jax_default_matmul_precision", "highest")

LENGTHS = [3, 11, 6, 8]
NEW = 10
GREEDY = SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=NEW)


def hf_model(cfg, seed=0):
    """HF's init (std 0.02) gives near-uniform attention, which hides position and cache-slot
    mistakes from a greedy comparison; larger q/k weights make attention sharp."""
    model = hf_model_small_init(cfg, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)
    return model


def prompts_for(cfg, lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    prompts = np.zeros((len(lengths), max(lengths)), np.int32)
    for i, n in enumerate(lengths):
        prompts[i, :n] = rng.integers(3, cfg.vocab_size, n)
    return prompts, np.asarray(lengths, np.int32)


def greedy_by_recomputation(cfg, params, prompt, n_new):
    """No cache: run the whole sequence again for every new token. The sequence sits in a fixed
    buffer (one compilation); causal attention keeps the unused tail from affecting it."""
    buf = np.zeros((1, max(LENGTHS) + NEW), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n_new):
        buf[0, i] = int(np.argmax(np.asarray(_full_logits(cfg, params, jnp.asarray(buf)))[0, i - 1, :cfg.vocab_size]))
    return buf[0, len(prompt):len(prompt) + n_new].tolist()


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(cfg, params, tokens):
    return bind(cfg, params)(tokens)


def hf_greedy(model, prompt, n_new, **kwargs):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=None,
                             pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("cfg", [MHA, GQA], ids=["multi-head", "grouped-query"])
def test_greedy_with_cache_equals_recomputation_and_transformers(cfg):
    hf = hf_model(cfg, seed=1)
    params = hf_params(hf, cfg)
    prompts, lengths = prompts_for(cfg)
    out = generate(cfg, GREEDY, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0))
    tokens = np.asarray(out["tokens"])
    assert np.asarray(out["lengths"]).tolist() == [NEW] * len(LENGTHS)
    assert not np.asarray(out["stopped"]).any()
    for row, n in enumerate(LENGTHS):
        prompt = prompts[row, :n].tolist()
        assert tokens[row].tolist() == greedy_by_recomputation(cfg, params, prompt, NEW), f"row {row}"
        assert tokens[row].tolist() == hf_greedy(hf, prompt, NEW), f"row {row}"


def test_greedy_repetition_penalty_on_prompt_equals_transformers():
    # HF's `generate(repetition_penalty=...)` penalises everything in input_ids, prompt included.
    cfg = GQA
    hf = hf_model(cfg, seed=2)
    params = hf_params(hf, cfg)
    prompts, lengths = prompts_for(cfg, seed=3)
    settings = SamplingSettings(greedy=True, repetition_penalty=1.2, penalize_prompt=True, max_new_tokens=NEW)
    tokens = np.asarray(generate(cfg, settings, params, jnp.asarray(prompts), jnp.asarray(lengths),
                                 jax.random.key(0))["tokens"])
    plain = np.asarray(generate(cfg, GREEDY, params, jnp.asarray(prompts), jnp.asarray(lengths),
                                jax.random.key(0))["tokens"])
    assert (tokens != plain).any(), "the penalty should change something on these prompts"
    for row, n in enumerate(LENGTHS):
        assert tokens[row].tolist() == hf_greedy(hf, prompts[row, :n].tolist(), NEW, repetition_penalty=1.2)


def test_each_row_stops_at_its_own_stop_token():
    cfg = MHA
    params = hf_params(hf_model(cfg, seed=1), cfg)
    prompts, lengths = prompts_for(cfg)
    free = np.asarray(generate(cfg, GREEDY, params, jnp.asarray(prompts), jnp.asarray(lengths),
                               jax.random.key(0))["tokens"])
    stop = int(free[1, 4])  # row 1 emits this at step 4 (or earlier); other rows maybe never
    out = generate(cfg, GREEDY, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(0),
                   stop_ids=(stop, cfg.vocab_size - 1))
    tokens, got = np.asarray(out["tokens"]), np.asarray(out["lengths"])
    for row in range(len(LENGTHS)):
        hits = np.flatnonzero(free[row] == stop)
        expected = int(hits[0]) if hits.size else NEW
        assert got[row] == expected and bool(out["stopped"][row]) == bool(hits.size)
        np.testing.assert_array_equal(tokens[row, :expected], free[row, :expected])
        if hits.size:
            assert tokens[row, expected] == stop and (tokens[row, expected + 1:] == 0).all()
    if (free == stop).any(axis=1).all():  # every row stopped: the loop ended early
        assert int(out["steps"]) == max(np.flatnonzero(free[r] == stop)[0] for r in range(len(LENGTHS))) + 1


# ---- transforms against Hugging Face's logits processors --------------------------------------

def random_logits(shape=(6, 300), seed=0):
    return np.random.default_rng(seed).normal(0, 3, shape).astype(np.float32)


def hf_apply(processor, logits, input_ids=None):
    ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if input_ids is None else torch.tensor(input_ids)
    return processor(ids, torch.tensor(logits)).numpy()


def assert_same_filtered(ours, theirs):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[kept], theirs[kept], rtol=1e-6)


@pytest.mark.parametrize("t", [0.7, 1.3])
def test_temperature_matches_hf(t):
    logits = random_logits()
    np.testing.assert_allclose(temperature(jnp.asarray(logits), t),
                               hf_apply(transformers.TemperatureLogitsWarper(t), logits), rtol=1e-6)


@pytest.mark.parametrize("p", [0.9, 0.5, 0.05])
def test_top_p_matches_hf(p):
    logits = random_logits(seed=1)
    logits[0] = 0.0  # ties everywhere: nothing may be dropped below p of the mass
    logits[1, 7] = 40.0  # one token holds all the mass: it alone survives
    ours = top_p(jnp.asarray(logits), p)
    theirs = hf_apply(transformers.TopPLogitsWarper(p), logits)
    assert_same_filtered(ours[1:], theirs[1:])
    assert np.isneginf(np.asarray(ours[1])).sum() == logits.shape[1] - 1
    assert not np.isneginf(np.asarray(ours[0])).any()


def test_top_k_matches_hf():
    logits = random_logits(seed=2)
    assert_same_filtered(top_k(jnp.asarray(logits), 17), hf_apply(transformers.TopKLogitsWarper(17), logits))


@pytest.mark.parametrize("penalty", [1.2, 0.8])
def test_repetition_penalty_matches_hf(penalty):
    logits = random_logits(seed=3)
    rng = np.random.default_rng(4)
    input_ids = rng.integers(0, logits.shape[1], (logits.shape[0], 40))  # repeats included
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    ours = repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), penalty)
    theirs = hf_apply(transformers.RepetitionPenaltyLogitsProcessor(penalty), logits, input_ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert not np.allclose(ours, logits)


def test_sampling_follows_the_processed_distribution():
    """Empirical frequencies over many keys = softmax of HF's processed logits (LIMA settings)."""
    logits = random_logits((1, 12), seed=5)
    seen = np.zeros_like(logits, bool)
    seen[0, np.argmax(logits)] = True  # the penalty must move mass away from this one
    s = SamplingSettings()  # LIMA: p=0.9, t=0.7, penalty 1.2
    hf = hf_apply(transformers.RepetitionPenaltyLogitsProcessor(1.2), logits, [[int(np.argmax(logits))]])
    hf = hf_apply(transformers.TemperatureLogitsWarper(0.7), hf)
    hf = hf_apply(transformers.TopPLogitsWarper(0.9), hf)
    expected = torch.softmax(torch.tensor(hf), -1).numpy()[0]
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = jax.jit(jax.vmap(lambda k: next_token(jnp.asarray(logits), jnp.asarray(seen), k, s)[0]))(keys)
    freq = np.bincount(np.asarray(draws), minlength=logits.shape[1]) / n
    assert freq[expected == 0].sum() == 0  # never a token top-p removed
    np.testing.assert_allclose(freq, expected, atol=0.015)


# ---- sharding and seeds -----------------------------------------------------------------------

def test_sharded_sampling_equals_one_device_and_seeds_are_per_row():
    cfg = GQA
    params = hf_params(hf_model(cfg, seed=4), cfg)
    prompts, lengths = prompts_for(cfg, seed=5)
    s = SamplingSettings(max_new_tokens=NEW, temperature=1.0)  # sampled, not greedy
    key = jax.random.key(7)
    device = jax.devices()[0]
    rows = np.arange(len(LENGTHS), dtype=np.int32)
    single = generate(cfg, s, jax.device_put(params, device), jax.device_put(prompts, device),
                      jax.device_put(lengths, device), key, row_ids=jax.device_put(rows, device))

    mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    p_shard = named_shardings(param_logical_axes(cfg), mesh)
    b_shard = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length")))
    row_shard = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch",)))
    with jax.set_mesh(mesh):
        sharded = generate(cfg, s, jax.device_put(params, p_shard), jax.device_put(prompts, b_shard),
                           jax.device_put(lengths, row_shard), key, row_ids=jax.device_put(rows, row_shard))
    assert len(sharded["tokens"].sharding.device_set) == 8
    np.testing.assert_array_equal(sharded["tokens"], single["tokens"])
    np.testing.assert_array_equal(sharded["lengths"], single["lengths"])

    # A row's answer depends on its seed and row id, not on its batch; another seed differs.
    order = np.array([2, 0, 3, 1])
    shuffled = generate(cfg, s, params, jnp.asarray(prompts[order]), jnp.asarray(lengths[order]), key,
                        row_ids=jnp.asarray(order))
    np.testing.assert_array_equal(np.asarray(shuffled["tokens"]), np.asarray(single["tokens"])[order])
    other = generate(cfg, s, params, jnp.asarray(prompts), jnp.asarray(lengths), jax.random.key(8),
                     row_ids=jnp.asarray(rows))
    assert (np.asarray(other["tokens"]) != np.asarray(single["tokens"])).any()

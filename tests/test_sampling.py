"""The one decode step (slots over a KV cache, continuous batching) against full recomputation
and transformers; LIMA's per-row transforms against HF's processors; answers that depend on the
seed and row id only, not on the slots, the neighbours or the mesh."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from lima_jax.model import bind, param_logical_axes
from lima_jax.sampling import SamplingSettings, decoding
from lima_jax.sampling.decode import TOP_LOGPROBS, Request, init_slots
from lima_jax.sampling.decoding import RowSettings, next_tokens, process, repetition_penalty, temperature
from lima_jax.sampling.sampler import Sampler
from lima_jax.sharding import make_mesh, named_shardings
from tests.references import MODEL_GQA as GQA, MODEL_MHA as MHA, hf_logits, hf_model as hf_model_small_init, hf_params

jax.config.update("jax_default_matmul_precision", "highest")

LENGTHS = [3, 11, 6, 8]
NEW = 10
GREEDY = SamplingSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=NEW)


@dataclasses.dataclass
class Ids:
    """The ids a Sampler reads from a tokenizer; stop ids outside the vocabulary stop nothing."""

    eos_id: int = 10**6
    eot_id: int = 10**6
    bos_id: int = 1


def sampler(cfg, params, mesh=None, **stops) -> Sampler:
    return Sampler(cfg, params, Ids(**stops), mesh)


def hf_model(cfg, seed=0):
    """HF's init (std 0.02) gives near-uniform attention, which hides position and cache-slot
    mistakes from a greedy comparison; larger q/k weights make attention sharp."""
    model = hf_model_small_init(cfg, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)
    return model


def prompts_for(cfg, lengths=LENGTHS, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]


def tokens(outs) -> list[list[int]]:
    return [o["ids"] for o in outs]


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
    """Two slots for four prompts: the later prompts go into slots an earlier answer used."""
    hf = hf_model(cfg, seed=1)
    params = hf_params(hf, cfg)
    prompts = prompts_for(cfg)
    outs = sampler(cfg, params).generate_ids(prompts, GREEDY, slots=2)
    assert [len(o["ids"]) for o in outs] == [NEW] * len(LENGTHS) and not any(o["stopped"] for o in outs)
    for row, prompt in enumerate(prompts):
        assert outs[row]["ids"] == greedy_by_recomputation(cfg, params, prompt, NEW), f"row {row}"
        assert outs[row]["ids"] == hf_greedy(hf, prompt, NEW), f"row {row}"


def test_decode_in_either_cache_layout_equals_transformers(kv_position_major):
    """Both KV cache layouts (this backend runs one; model.kv_cache.Layout), two slots for four
    prompts: the decode step's tokens are transformers' greedy ones, and its log-probabilities
    (the token's and the top TOP_LOGPROBS) are the log-softmax of transformers' logits."""
    cfg = dataclasses.replace(GQA, kv_position_major=kv_position_major)
    hf = hf_model(cfg, seed=1)
    prompts = prompts_for(cfg)
    decoder = sampler(cfg, hf_params(hf, cfg)).decoder(2)
    waiting, got = list(enumerate(prompts)), {}  # row -> [(token, logprob, top logprobs)]
    while waiting or decoder.active:
        admitted, waiting = waiting[:len(decoder.free)], waiting[len(decoder.free):]
        decoder.admit([(row, Request(tuple(p), NEW, greedy=True, repetition_penalty=1.0)) for row, p in admitted])
        out, events = decoder.step()
        for slot, row, token, _ in events:
            got.setdefault(row, []).append((token, out["logprob"][slot], out["top_logprobs"][slot]))
    for row, prompt in enumerate(prompts):
        answer = [token for token, _, _ in got[row]]
        assert answer == hf_greedy(hf, prompt, NEW), f"row {row}"
        logits = torch.tensor(hf_logits(hf, [prompt + answer])[0, len(prompt) - 1:-1])  # the answer's steps
        expected = torch.log_softmax(logits, -1).numpy()
        np.testing.assert_allclose([lp for _, lp, _ in got[row]], expected[np.arange(NEW), answer], atol=1e-4)
        np.testing.assert_allclose(np.stack([top for _, _, top in got[row]]),
                                   -np.sort(-expected, axis=-1)[:, :TOP_LOGPROBS], atol=1e-4)


def test_cache_layout_is_the_traced_for_platforms():
    """aot_check traces a TPU decode step on a CPU host: its cache is TPU's position-major one,
    this host's head-major (an abstract TPU mesh, as test_model's tuning test)."""
    slots = jax.device_count()  # the cache's rows shard over fsdp
    with jax.set_mesh(jax.make_mesh((slots,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))):
        here = jax.sharding.get_abstract_mesh()
        assert jax.eval_shape(init_slots, GQA, slots, 16)["cache"]["k"].shape == (2, slots, 2, 16, 16)  # [L, B, KV, T, D]
    tpu = type(here.abstract_device)(device_kind="TPU v4", num_cores=2, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(here.axis_sizes, here.axis_names, here.axis_types,
                                                                  abstract_device=tpu)):
        assert jax.eval_shape(init_slots, GQA, slots, 16)["cache"]["k"].shape == (2, slots, 16, 2, 16)  # [L, B, T, KV, D]


def test_greedy_repetition_penalty_on_prompt_equals_transformers():
    # HF's `generate(repetition_penalty=...)` penalises everything in input_ids, prompt included.
    cfg = GQA
    hf = hf_model(cfg, seed=2)
    params = hf_params(hf, cfg)
    prompts = prompts_for(cfg, seed=3)
    settings = SamplingSettings(greedy=True, repetition_penalty=1.2, penalize_prompt=True, max_new_tokens=NEW)
    penalized = tokens(sampler(cfg, params).generate_ids(prompts, settings, slots=3))
    assert penalized != tokens(sampler(cfg, params).generate_ids(prompts, GREEDY, slots=3)), \
        "the penalty should change something on these prompts"
    for row, prompt in enumerate(prompts):
        assert penalized[row] == hf_greedy(hf, prompt, NEW, repetition_penalty=1.2)


def test_each_row_stops_at_its_own_stop_token():
    cfg = MHA
    params = hf_params(hf_model(cfg, seed=1), cfg)
    prompts = prompts_for(cfg)
    free = tokens(sampler(cfg, params).generate_ids(prompts, GREEDY))
    stop = free[1][4]  # row 1 emits this at step 4 (or earlier); other rows maybe never
    outs = sampler(cfg, params, eos_id=stop, eot_id=cfg.vocab_size - 1).generate_ids(prompts, GREEDY, slots=2)
    for row in range(len(LENGTHS)):
        hits = [i for i, t in enumerate(free[row]) if t in (stop, cfg.vocab_size - 1)]
        expected = hits[0] if hits else NEW
        assert outs[row] == dict(ids=free[row][:expected], stopped=bool(hits)), f"row {row}"


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


def per_row(value, rows=6, dtype=np.float32):
    return jnp.full((rows,), value, dtype)


def top_p(logits, p):
    return decoding.top_p(logits, per_row(p, len(logits)), per_row(1.0 - p, len(logits)))


def top_k(logits, k):
    return decoding.top_k(logits, per_row(k, len(logits), np.int32))


@pytest.mark.parametrize("t", [0.7, 1.3])
def test_temperature_matches_hf(t):
    logits = random_logits()
    np.testing.assert_allclose(temperature(jnp.asarray(logits), per_row(t)),
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


@pytest.mark.parametrize("scale, decimals", [(1.0, None), (4.0, None), (2.0, 0), (0.01, 3)],
                         ids=["flat", "peaked", "ties", "near-uniform"])
def test_top_p_by_bisection_keeps_what_hfs_rule_keeps(scale, decimals):
    logits = scale * np.asarray(jax.random.normal(jax.random.key(7), (6, 500)))
    if decimals is not None:
        logits = np.round(logits, decimals)
    for p in (0.05, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0):
        np.testing.assert_array_equal(np.isfinite(top_p(jnp.asarray(logits), p)), top_p_kept(logits, p), f"top_p={p}")


def top_p_kept(logits, p):
    """HF's rule in numpy (float64), ties with the smallest kept logit kept (HF splits them by sort order)."""
    ascending = np.sort(logits.astype(np.float64), axis=-1)
    probs = np.exp(ascending - ascending[:, -1:])
    cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), axis=-1)
    removed = cumulative <= 1.0 - p
    removed[:, -1] = False
    threshold = np.take_along_axis(ascending, removed.sum(-1, keepdims=True), axis=-1)
    return logits >= threshold


@pytest.mark.parametrize("k", [1, 17, 299])
def test_top_k_matches_hf(k):
    logits = random_logits(seed=2)
    logits[0] = np.round(logits[0])  # ties with the k-th are kept
    assert_same_filtered(top_k(jnp.asarray(logits), k), hf_apply(transformers.TopKLogitsWarper(k), logits))


@pytest.mark.parametrize("penalty", [1.2, 0.8])
def test_repetition_penalty_matches_hf(penalty):
    logits = random_logits(seed=3)
    rng = np.random.default_rng(4)
    input_ids = rng.integers(0, logits.shape[1], (logits.shape[0], 40))  # repeats included
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    ours = repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), per_row(penalty))
    theirs = hf_apply(transformers.RepetitionPenaltyLogitsProcessor(penalty), logits, input_ids)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert not np.allclose(ours, logits)


ROWS = [SamplingSettings(),  # LIMA's
        SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0),
        SamplingSettings(temperature=0.3, top_p=0.5, repetition_penalty=2.0, top_k=40),
        SamplingSettings(greedy=True, repetition_penalty=1.3),
        SamplingSettings(temperature=1.7, top_p=0.99, repetition_penalty=1.1, top_k=5),
        SamplingSettings(temperature=0.9, top_p=1.0, top_k=250)]


@pytest.mark.parametrize("draw", range(3))
def test_rows_with_their_own_settings_match_hf_chains(draw):
    """One batch, every row its own settings: each row's warped logits are HF's chain for its
    settings (penalty, temperature, top-k, top-p); a greedy row picks HF's argmax after the penalty."""
    logits = random_logits((len(ROWS), 300), seed=10 + draw)
    input_ids = np.random.default_rng(draw).integers(0, 300, (len(ROWS), 30))
    seen = np.zeros(logits.shape, bool)
    np.put_along_axis(seen, input_ids, True, axis=1)
    rows = jax.tree.map(jnp.asarray, RowSettings.of(ROWS))
    ours = np.asarray(process(jnp.asarray(logits), jnp.asarray(seen), rows))
    picked = np.asarray(next_tokens(jnp.asarray(logits), jnp.asarray(seen), jnp.zeros_like(logits),
                                    jax.random.split(jax.random.key(draw), len(ROWS)), rows))
    for b, s in enumerate(ROWS):
        chain = [transformers.RepetitionPenaltyLogitsProcessor(s.repetition_penalty)]
        if s.greedy:
            assert picked[b] == np.argmax(hf_apply(chain[0], logits[b:b + 1], input_ids[b:b + 1])[0]), b
            continue
        chain += [transformers.TemperatureLogitsWarper(s.temperature)]
        chain += [transformers.TopKLogitsWarper(s.top_k)] if s.top_k else []
        chain += [transformers.TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []
        theirs = logits[b:b + 1]
        for processor in chain:
            theirs = hf_apply(processor, theirs, input_ids[b:b + 1])
        assert_same_filtered(ours[b:b + 1], theirs)
        assert np.isfinite(ours[b, picked[b]]), b  # the draw is never a removed token


def test_logit_bias_moves_the_argmax():
    logits = jnp.zeros((2, 10)).at[:, 3].set(5.0)
    bias = jnp.zeros((2, 10)).at[1, 3].set(-100.0).at[1, 7].set(1.0)
    greedy = jax.tree.map(jnp.asarray, RowSettings.of([SamplingSettings(greedy=True)] * 2))
    picked = next_tokens(logits, jnp.zeros((2, 10), bool), bias, jax.random.split(jax.random.key(0), 2), greedy)
    assert picked.tolist() == [3, 7]


def test_sampling_follows_the_processed_distribution():
    """Empirical frequencies over many keys = softmax of HF's processed logits (LIMA settings)."""
    logits = random_logits((1, 12), seed=5)
    seen = np.zeros_like(logits, bool)
    seen[0, np.argmax(logits)] = True  # the penalty must move mass away from this one
    hf = hf_apply(transformers.RepetitionPenaltyLogitsProcessor(1.2), logits, [[int(np.argmax(logits))]])
    hf = hf_apply(transformers.TemperatureLogitsWarper(0.7), hf)
    hf = hf_apply(transformers.TopPLogitsWarper(0.9), hf)
    expected = torch.softmax(torch.tensor(hf), -1).numpy()[0]
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    lima = jax.tree.map(jnp.asarray, RowSettings.of([SamplingSettings()]))  # p=0.9, t=0.7, penalty 1.2
    draw = lambda k: next_tokens(jnp.asarray(logits), jnp.asarray(seen), jnp.zeros_like(logits), k[None], lima)[0]  # noqa: E731
    draws = jax.jit(jax.vmap(draw))(keys)
    freq = np.bincount(np.asarray(draws), minlength=logits.shape[1]) / n
    assert freq[expected == 0].sum() == 0  # never a token top-p removed
    np.testing.assert_allclose(freq, expected, atol=0.015)


# ---- sharding, slots and seeds ----------------------------------------------------------------

def test_sharded_sampling_equals_one_device_and_seeds_are_per_row():
    cfg = GQA
    params = hf_params(hf_model(cfg, seed=4), cfg)
    prompts = prompts_for(cfg, seed=5)
    s = SamplingSettings(max_new_tokens=NEW, temperature=1.0)  # sampled, not greedy
    device = jax.devices()[0]
    single = tokens(sampler(cfg, jax.device_put(params, device)).generate_ids(prompts, s, seed=7))

    mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    sharded_params = jax.device_put(params, named_shardings(param_logical_axes(cfg), mesh))
    assert tokens(sampler(cfg, sharded_params, mesh).generate_ids(prompts, s, seed=7)) == single

    # A row's answer depends on its seed and row id, not on its slot or neighbours; another seed differs.
    order = [2, 0, 3, 1]
    shuffled = sampler(cfg, params).generate_ids([prompts[i] for i in order], s, seed=7, row_ids=order, slots=3)
    assert tokens(shuffled) == [single[i] for i in order]
    alone = sampler(cfg, params).generate_ids([prompts[3]], s, seed=7, row_ids=[3], slots=1)
    assert tokens(alone) == [single[3]]
    assert tokens(sampler(cfg, params).generate_ids(prompts, s, seed=8)) != single

"""A small model config and random packed batches for the loss/sharding/train-step tests.
Not a test module: test modules import from here, never from each other."""

import jax
import numpy as np

from lima_jax.model import ModelConfig

jax.config.update("jax_default_matmul_precision", "highest")

CFG = ModelConfig(vocab_size=250, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_multiple=16,
                  remat_policy="full")


def random_batch(rows=8, seq=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (rows, seq + 1))
    seg = np.cumsum(rng.random((rows, seq)) < 0.1, axis=1) + 1  # packed-looking rows
    positions = np.zeros_like(seg)
    for r in range(rows):
        for t in range(1, seq):
            positions[r, t] = 0 if seg[r, t] != seg[r, t - 1] else positions[r, t - 1] + 1
    return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], positions=positions, segment_ids=seg,
                loss_weights=(rng.random((rows, seq)) < 0.7).astype(np.float32))


def fit_to_answers(cfg: ModelConfig, encoded, steps: int) -> dict:
    """Params of `cfg` fitted with Adam to `encoded` ([(ids, loss weights)], one conversation
    each, as a chat format encodes them) until their answers are learnt (loss < 0.05)."""
    import jax.numpy as jnp
    import optax

    from lima_jax.model import bind, init_params

    width = max(len(ids) for ids, _ in encoded)
    ids, weights = np.zeros((len(encoded), width), np.int32), np.zeros((len(encoded), width), np.float32)
    for row, (i, w) in enumerate(encoded):
        ids[row, :len(i)], weights[row, :len(w)] = i, w
    tokens, targets, weights = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:]), jnp.asarray(weights[:, 1:])

    def loss(params):
        logp = jax.nn.log_softmax(bind(cfg, params)(tokens))
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return (nll * weights).sum() / weights.sum()

    optimizer = optax.adam(1e-2)

    @jax.jit
    def step(params, state):
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    params = init_params(cfg, jax.random.key(0))
    state = optimizer.init(params)
    for _ in range(steps):
        params, state, value = step(params, state)
    assert float(value) < 0.05, f"the tiny model did not learn its answers (loss {float(value)})"
    return jax.device_get(params)

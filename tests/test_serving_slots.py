"""The pieces under the server, without HTTP: per-row decoding transforms equal transforms.py's
for each row's settings; the text stream never releases a stop string's start or half a
character, and its pieces join to the final text; engine requests the cache cannot hold are
refused; model ids from checkpoint paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax.sampling import transforms
from lima_jax.sampling.row_transforms import RowSettings, next_tokens, top_p
from lima_jax.serving.server import model_name_from_path
from lima_jax.serving.text import TextStream

ROWS = [transforms.SamplingSettings(),  # LIMA's
        transforms.SamplingSettings(temperature=1.0, top_p=1.0, repetition_penalty=1.0),
        transforms.SamplingSettings(temperature=0.3, top_p=0.5, repetition_penalty=2.0),
        transforms.SamplingSettings(greedy=True, repetition_penalty=1.3),
        transforms.SamplingSettings(greedy=True, repetition_penalty=1.0),
        transforms.SamplingSettings(temperature=1.7, top_p=0.99, repetition_penalty=1.1)]


def row_settings(rows) -> RowSettings:
    return RowSettings(jnp.asarray([1.0 if s.greedy else s.temperature for s in rows], jnp.float32),
                       jnp.asarray([s.top_p for s in rows], jnp.float32),
                       jnp.asarray([1.0 - s.top_p for s in rows], jnp.float32),
                       jnp.asarray([s.repetition_penalty for s in rows], jnp.float32),
                       jnp.asarray([s.greedy for s in rows]))


@pytest.mark.parametrize("draw", range(4))
def test_per_row_tokens_equal_transforms_per_row(draw):
    vocab = 300
    k1, k2, k3 = jax.random.split(jax.random.key(draw), 3)
    logits = 3 * jax.random.normal(k1, (len(ROWS), vocab))
    seen = jax.random.bernoulli(k2, 0.1, (len(ROWS), vocab))
    keys = jax.random.split(k3, len(ROWS))
    got = next_tokens(logits, seen, jnp.zeros_like(logits), keys, row_settings(ROWS))
    for b, s in enumerate(ROWS):
        want = transforms.next_token(logits[b][None], seen[b][None], keys[b], s)[0]
        assert int(got[b]) == int(want), (b, s)


@pytest.mark.parametrize("scale, decimals", [(1.0, None), (4.0, None), (2.0, 0), (0.01, 3)],
                         ids=["flat", "peaked", "ties", "near-uniform"])
def test_top_p_by_bisection_keeps_what_the_sort_keeps(scale, decimals):
    ps = [0.05, 0.3, 0.5, 0.9, 0.95, 0.999, 1.0]
    logits = scale * jax.random.normal(jax.random.key(7), (len(ps), 500))
    if decimals is not None:
        logits = jnp.round(logits, decimals)
    got = top_p(logits, jnp.asarray(ps, jnp.float32), jnp.asarray([1.0 - p for p in ps], jnp.float32))
    for b, p in enumerate(ps):
        want = transforms.top_p(logits[b], p)
        np.testing.assert_array_equal(np.isfinite(got[b]), np.isfinite(want), err_msg=f"top_p={p}")
    assert int(np.isfinite(got).sum(-1).min()) >= 1


def test_logit_bias_moves_the_argmax():
    logits = jnp.zeros((2, 10)).at[:, 3].set(5.0)
    bias = jnp.zeros((2, 10)).at[1, 3].set(-100.0).at[1, 7].set(1.0)
    tokens = next_tokens(logits, jnp.zeros((2, 10), bool), bias, jax.random.split(jax.random.key(0), 2),
                         row_settings([ROWS[4], ROWS[4]]))
    assert tokens.tolist() == [3, 7]


class CharTokenizer:
    """Token i is character i of a table; 99 then 98 is "é" (a character over two byte tokens)."""

    def __init__(self, table: str):
        self.table = table

    def decode(self, ids) -> str:
        text, i = "", 0
        while i < len(ids):
            if ids[i] == 99:  # the first half of "é": complete only with the next token 98
                text += "é" if i + 1 < len(ids) and ids[i + 1] == 98 else "\ufffd"
                i += 2 if i + 1 < len(ids) and ids[i + 1] == 98 else 1
            else:
                text += self.table[ids[i]]
                i += 1
        return text


def stream(ids, stop=()) -> tuple[list[str], TextStream]:
    ts = TextStream(CharTokenizer("abc STOPxyz"), stop)
    pieces = [ts.add(i) for i in ids]
    pieces.append(ts.finish())
    return pieces, ts


def test_text_stream_holds_back_stop_prefixes_and_half_characters():
    ids = [0, 1, 99, 98, 3, 4, 5, 6, 7, 2]  # "abé STOPc"
    pieces, ts = stream(ids)
    assert "".join(pieces) == "abé STOPc" and "\ufffd" not in "".join(pieces) and not ts.stopped
    pieces, ts = stream(ids, stop=["STOP"])
    assert "".join(pieces) == "abé " and ts.stopped
    assert "S" not in "".join(pieces[:8])  # "S", "ST", "STO" were held back until they became the stop
    pieces, ts = stream([4, 5, 0], stop=["STOP"])  # a held-back "ST" that was not a stop after all
    assert "".join(pieces) == "STa" and not ts.stopped


@pytest.mark.parametrize("path, name", [("/w/run7/checkpoints/1500", "run7-1500"), ("gs://b/run7/checkpoints", "run7"),
                                        ("/w/llama65b/", "llama65b")])
def test_model_names(path, name):
    assert model_name_from_path(path) == name


def test_engine_refuses_what_the_cache_cannot_hold():
    from lima_jax.serving.engine import Engine, Request

    class Fake:  # check() needs only the config
        cfg = type("Cfg", (), {"max_seq_len": 8})()

    engine = Engine.__new__(Engine)
    engine.cfg = Fake.cfg
    with pytest.raises(ValueError, match="1 to 7"):
        engine.check(Request(tuple(range(8)), 1))
    with pytest.raises(ValueError, match="max_tokens=5: 1 to 4"):
        engine.check(Request(tuple(range(4)), 5))
    engine.check(Request(tuple(range(4)), 4))
    engine.check(Request((1,), 7))

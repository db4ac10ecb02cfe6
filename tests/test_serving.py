"""launch/serve.py, through the official `openai` client, on a tiny trained checkpoint (the
model of tests/test_export_chat.py, trained to answer a few conversations and end with EOT).

One server (a subprocess on a free port, 16 slots) serves the whole module. What it shows:
greedy answers equal launch/sample.py's and a reference that recomputes the whole sequence for
every token (no cache, no slots), single- and multi-turn; seeded ones equal the Sampler's; streamed
pieces join to the non-streamed text; top_logprobs are the model's log-softmax; 16
concurrent clients get the answers each prompt gets alone, while the engine holds several
at once; stop strings, logit_bias, seeds and raw completions; malformed requests get an
OpenAI-style 400 and the server goes on serving."""

import concurrent.futures
import functools
import time

import httpx
import jax
import numpy as np
import openai
import pytest

from lima_jax import model_store
from lima_jax.data.tokenizer import SentencePieceTokenizer
from lima_jax.model import bind
from lima_jax.sampling import SamplingSettings
from lima_jax.sampling.sampler import load_sampler
from tests.serving_fixtures import serve_py
from tests.test_convert import train_tokenizer
from tests.test_convert_sampling import sample_cli
from tests.test_export_chat import CFG, PIECES, TRAIN, train

MAX_NEW = 40
OTHER = [["Tell me about the sea."], ["What is 2 plus 2?"], ["Spell \"pear\" backwards."], ["Why is the sky blue?"],
         ["Give me one tip about food."], ["What is 4 plus 5?"], ["Hi"], ["Name a colour."], ["What is 3 plus 3?"],
         ["Give me one tip about work."], ["Write a poem."], ["What is 12 plus 1?"]]
PROMPTS = [TRAIN[0][:1], TRAIN[1][:1], TRAIN[2][:1], TRAIN[3][:3]] + OTHER  # 16


def build_checkpoint(path) -> str:
    """A tiny LIMA-style chat checkpoint (trained here) with its tokenizer and EOT id."""
    proto = train_tokenizer(PIECES, byte_fallback=True)
    tokenizer = SentencePieceTokenizer(proto)
    meta = model_store.CheckpointMeta(model=CFG, step=250, eot_id=PIECES, tokenizer=tokenizer.to_record())
    model_store.save_params(path, train(tokenizer), meta)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("serving") / "run" / "checkpoints" / "250")


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """The base URL of launch/serve.py serving `ckpt`, stopped after the module."""
    with serve_py(ckpt, tmp_path_factory.mktemp("server") / "serve.log", "--slots", "16") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def sampler(ckpt):
    return load_sampler(ckpt)[0]


def greedy_reference(sampler, prompt, max_new, penalty=1.0) -> dict:
    """Greedy decoding without a cache or slots: the whole sequence through the model for every
    token, the repetition penalty on the answer's tokens in numpy, stop at EOS or EOT."""
    cfg, ids = sampler.cfg, list(prompt)
    params = jax.device_get(sampler.params)
    answer = []
    while len(answer) < max_new:
        buffer = np.zeros((1, cfg.max_seq_len), np.int32)  # one shape: causal attention ignores the tail
        buffer[0, :len(ids) + len(answer)] = ids + answer
        logits = np.array(_full_logits(cfg, params, buffer)[0, len(ids) + len(answer) - 1, :cfg.vocab_size])
        seen = np.unique(answer).astype(int)
        logits[seen] = np.where(logits[seen] < 0, logits[seen] * np.float32(penalty), logits[seen] / np.float32(penalty))
        token = int(np.argmax(logits))
        if token in sampler.stop_ids:
            return dict(ids=answer, stopped=True)
        answer.append(token)
    return dict(ids=answer, stopped=False)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(cfg, params, tokens):
    return bind(cfg, params)(tokens)


def messages(turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def ask(client, turns, **kw):
    kw.setdefault("max_tokens", MAX_NEW)
    return client.chat.completions.create(model="run-250", messages=messages(turns), **kw)


def greedy(client, turns, penalty=1.0, **kw):
    return ask(client, turns, temperature=0, extra_body={"repetition_penalty": penalty}, **kw)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["run-250"]  # WORKDIR/checkpoints/STEP -> run-STEP
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["slots"] == 16


def test_greedy_answers_equal_sample_py(client, ckpt):
    """Multi-turn here; single-turn prompts in the next test (the Sampler is what sample.py runs)."""
    turns = TRAIN[3][:3]
    out = greedy(client, turns)
    expected = next(t for t in TRAIN if t[:len(turns)] == turns)[len(turns)]
    assert out.choices[0].message.content == expected  # what it was trained to answer
    assert out.choices[0].finish_reason == "stop"
    answer, count = sample_cli(ckpt, turns[-1], turns=turns[:-1], fmt="lima", max_new=MAX_NEW)
    assert (out.choices[0].message.content, out.usage.completion_tokens) == (answer, count)


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_answers_equal_recomputation(client, sampler, penalty):
    """Prompts the model was not trained on too (any argmax, not just memorised answers)."""
    for turns in PROMPTS[:8]:
        ref = greedy_reference(sampler, sampler.prompt_ids(turns), MAX_NEW, penalty)
        out = greedy(client, turns, penalty)
        assert out.choices[0].message.content == sampler.tokenizer.decode(ref["ids"]), turns
        assert out.usage.completion_tokens == len(ref["ids"])
        assert out.usage.prompt_tokens == len(sampler.prompt_ids(turns))
        assert out.choices[0].finish_reason == ("stop" if ref["stopped"] else "length")


def test_seeded_sampling_equals_the_samplers(client, sampler):
    """A seeded request draws the stream of sample.py's --prompt (row 0), so the same answer."""
    settings = SamplingSettings(temperature=1.5, top_p=0.95, max_new_tokens=MAX_NEW)
    for seed in (1, 2):
        [ref] = sampler.generate_ids([sampler.prompt_ids(OTHER[0])], settings, seed=seed)
        out = ask(client, OTHER[0], temperature=1.5, top_p=0.95, seed=seed)
        assert out.choices[0].message.content == sampler.tokenizer.decode(ref["ids"])


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.3, seed=5)], ids=["greedy", "sampled"])
def test_streamed_pieces_join_to_the_answer(client, kw):
    whole = ask(client, OTHER[0], **kw)
    stream = ask(client, OTHER[0], stream=True, stream_options={"include_usage": True}, **kw)
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 1  # it did stream
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason and usage == whole.usage


def test_top_logprobs_are_the_models_log_softmax(client, sampler):
    turns = TRAIN[3][:3]
    out = greedy(client, turns, logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    prompt = sampler.prompt_ids(turns)
    ref = greedy_reference(sampler, prompt, MAX_NEW)
    assert len(content) == len(ref["ids"]) == out.usage.completion_tokens
    tokens = np.asarray([prompt + ref["ids"]])
    logits = np.asarray(jax.jit(lambda p, t: bind(sampler.cfg, p)(t))(jax.device_get(sampler.params), tokens))[0]
    logits = logits[:, :sampler.cfg.vocab_size].astype(np.float64)  # the real vocabulary, EOT included
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    for i, (entry, token) in enumerate(zip(content, ref["ids"])):
        row = logp[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(np.sort(row)[::-1][:5], abs=1e-4)
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the most likely token
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in content).strip() == out.choices[0].message.content.strip()


def test_sixteen_concurrent_clients_get_their_own_answers(client, server):
    """Half greedy, half sampled with their own seeds: each equals the same request served alone."""
    requests = [dict(temperature=0) if i % 2 == 0 else dict(temperature=1.2, seed=100 + i) for i in range(16)]
    alone = [ask(client, t, **kw).choices[0].message.content for t, kw in zip(PROMPTS, requests)]
    peak = httpx.get(f"{server}/health").json()["peak_active"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: ask(client, PROMPTS[i], **requests[i]).choices[0].message.content,
                                 range(16)))
    assert together == alone
    assert httpx.get(f"{server}/health").json()["peak_active"] > max(peak, 4)  # the engine held several at once


def test_stop_strings_cut_the_answer(client):
    full = greedy(client, TRAIN[2][:1]).choices[0].message.content
    assert full == TRAIN[2][1]
    out = greedy(client, TRAIN[2][:1], stop=["same", "zzz"])
    assert out.choices[0].message.content == full[:full.index("same")]
    assert out.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in greedy(client, TRAIN[2][:1], stop="same", stream=True)
              if c.choices]
    assert "".join(pieces) == full[:full.index("same")]


def test_max_tokens_and_logit_bias(client, sampler):
    out = greedy(client, TRAIN[0][:1], max_tokens=3)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    first = greedy(client, TRAIN[0][:1], max_tokens=1, logprobs=True).choices[0].logprobs.content[0]
    first_id = sampler.tokenizer.sp.piece_to_id(first.token.replace(" ", "\u2581"))
    banned = greedy(client, TRAIN[0][:1], max_tokens=1, logprobs=True, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.content[0].token != first.token


def test_raw_completions(client, sampler):
    prompt = "What is 2 plus"
    out = client.completions.create(model="run-250", prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                    extra_body={"repetition_penalty": 1.0})
    ref = greedy_reference(sampler, sampler.prompt_ids(prompt, "raw"), 12)
    assert out.choices[0].text == sampler.tokenizer.decode(ref["ids"])
    logprobs = out.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(logprobs.text_offset) == len(ref["ids"])
    assert logprobs.text_offset == np.cumsum([0] + [len(t) for t in logprobs.tokens[:-1]]).tolist()
    streamed = client.completions.create(model="run-250", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                         extra_body={"repetition_penalty": 1.0})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


BAD = {
    "empty messages": dict(messages=[]),
    "system role": dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    "unknown role": dict(messages=[{"role": "tool", "content": "Hi"}]),
    "two user turns": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hi"}]),
    "ends with assistant": dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]),
    "wrong type": dict(messages=messages(["Hi"]), temperature="hot"),
    "content of wrong type": dict(messages=[{"role": "user", "content": 3}]),
    "unknown field": dict(messages=messages(["Hi"]), extra_body={"best_of": {"a": 1}}),
    "over-long prompt": dict(messages=messages(["one two three four five six " * 40])),
    "n over the slots": dict(messages=messages(["Hi"]), n=17),
    "logit_bias outside the vocabulary": dict(messages=messages(["Hi"]), logit_bias={"99999": 1}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_request_gets_400_and_the_next_is_served(client, case):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="run-250", **BAD[case])
    error = caught.value.response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and "param" in error and "code" in error
    if case == "over-long prompt":
        assert error["code"] == "context_length_exceeded" and "127" in error["message"]
    if case == "system role":
        assert "no system role" in error["message"]
    assert greedy(client, TRAIN[0][:1]).choices[0].message.content == TRAIN[0][1]


def test_invalid_json_and_unknown_route(server):
    bad = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(f"{server}/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_client_that_goes_away_frees_its_slot(client, server):
    """Closing a stream cancels the request: the engine stops decoding it long before max_tokens."""
    before = httpx.get(f"{server}/health").json()["steps"]
    stream = ask(client, OTHER[0], temperature=0, max_tokens=100, logprobs=True, stream=True,
                 logit_bias={str(PIECES): -100, "2": -100})  # no EOT or EOS: it would run all 100 tokens
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.time() + 60
    while (health := httpx.get(f"{server}/health").json())["active"] and time.time() < deadline:
        time.sleep(0.2)
    assert health["active"] == 0 and health["steps"] - before < 60

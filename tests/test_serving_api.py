"""launch/serve.py as evaluation harnesses and shared machines use it, on a tiny random model
(4 slots, an API key, a 1 MiB body limit; one server for the module).

- lm-evaluation-harness's `local-completions` on a multiple-choice task of tests/data/lm_eval
  gets the accuracy and per-choice loglikelihoods that the model's own forward pass gives the
  same continuations (tokenized as lm-eval does: context, then the rest of context+choice).
- `echo` returns the prompt's logprobs (the first null) as that forward pass computes them;
  `max_tokens: 0` only scores; `n` choices draw the Sampler's streams 0..n-1 of the seed.
- Hardening: malformed fields get a 400 and the keep-alive connection goes on serving; bodies
  over the limit a 413; no key a 401 (but /health); clients that give up, streaming or not,
  free their slots long before max_tokens; /metrics counts what was served. Throughout, a
  watcher asks /health every 0.1 s and every answer comes within a second.
"""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lima_jax import model_store
from lima_jax.data.tokenizer import SentencePieceTokenizer
from lima_jax.model import bind, init_params
from lima_jax.sampling import SamplingSettings
from lima_jax.sampling.sampler import load_sampler
from tests.conftest import ROOT, cpu_env
from tests.convert_fixtures import train_tokenizer
from tests.serving_fixtures import serve_py
from tests.test_export_chat import CFG, PIECES

KEY = "test-key-4f2a"
SLOTS = 4
TASK_DIR = ROOT / "tests" / "data" / "lm_eval"
NO_END = {str(PIECES): -100, "2": -100}  # logit_bias: never EOT or EOS, so an answer runs to max_tokens


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tokenizer = SentencePieceTokenizer(train_tokenizer(PIECES, byte_fallback=True))
    params = jax.device_get(init_params(CFG, jax.random.key(5)))
    path = tmp_path_factory.mktemp("api") / "run" / "checkpoints" / "1"
    model_store.save_params(path, params, model_store.CheckpointMeta(model=CFG, step=1, eot_id=PIECES,
                                                                     tokenizer=tokenizer.to_record()))
    return str(path)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with serve_py(ckpt, log, "--slots", str(SLOTS), "--api_key_env", "LIMA_TEST_KEY", "--max_body_mb", "1",
                  env=cpu_env(1, fast_compile=True, LIMA_TEST_KEY=KEY)) as url:  # compiles much, runs little
        yield url


@pytest.fixture(scope="module")
def watcher(server):
    """Seconds each /health took, asked every 0.1 s by another client while the tests run."""
    took, stop = [], threading.Event()

    def watch():
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                start = time.monotonic()
                assert client.get(f"{server}/health").status_code == 200
                took.append(time.monotonic() - start)
                stop.wait(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield took
    stop.set()
    thread.join()


@pytest.fixture(scope="module")
def http(server, watcher):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def client(server, watcher):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sampler(ckpt):
    return load_sampler(ckpt)[0]


@pytest.fixture(scope="module")
def forward(sampler):
    """Token ids -> [len, vocab] float64 log-softmax of the model's logits (no cache, no slots)."""
    params = jax.device_get(sampler.params)
    logits_of = jax.jit(lambda p, t: bind(sampler.cfg, p)(t))

    def logprobs(ids):
        padded = np.zeros((1, sampler.cfg.max_seq_len), np.int32)  # one shape: causal attention ignores the tail
        padded[0, :len(ids)] = ids
        logits = np.asarray(logits_of(params, padded))[0, :len(ids), :sampler.cfg.vocab_size].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

    return logprobs


def test_lm_eval_local_completions_equals_direct_scoring(server, sampler, forward, tmp_path):
    out = tmp_path / "lm_eval"
    subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
                    f"base_url={server}/v1/completions,model=run-1,auth_token={KEY},max_length=128,max_retries=1",
                    "--tasks", "lima_tiny_mc", "--include_path", str(TASK_DIR), "--output_path", str(out),
                    "--log_samples"], cwd=ROOT, check=True, capture_output=True, timeout=600,
                   env=dict(os.environ, OPENAI_API_KEY=KEY, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"))
    [results] = out.rglob("results_*.json")
    [samples] = out.rglob("samples_lima_tiny_mc_*.jsonl")
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    docs = [json.loads(line) for line in (TASK_DIR / "tiny_mc.jsonl").read_text().splitlines()]
    assert len(rows) == len(docs)
    encode, correct = sampler.tokenizer.encode, []
    for doc, row in zip(docs, rows):
        context = f"Question: {doc['question']}\nAnswer:"
        expected = []
        for choice in doc["choices"]:  # lm-eval: " " before the choice; its tokens = whole minus context's
            whole, context_ids = encode(context + " " + choice), encode(context)
            ids = context_ids + whole[len(context_ids):]
            logprobs = forward(ids)
            expected.append(sum(logprobs[i - 1, ids[i]] for i in range(len(context_ids), len(ids))))
        got = [float(resp[0][0]) for resp in row["resps"]]  # logged as text
        assert got == pytest.approx(expected, abs=2e-4), doc["question"]
        correct.append(int(np.argmax(expected)) == doc["answer"])
    assert [r["acc"] for r in rows] == [float(c) for c in correct]
    acc = json.loads(results.read_text())["results"]["lima_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(np.mean(correct))


def test_echo_scores_the_prompt(client, sampler, forward):
    text = "Tell me about the sea and the sky."
    ids = sampler.prompt_ids(text, "raw")  # BOS first: the echo shows what the model read
    logprobs = forward(ids)
    only = client.completions.create(model="run-1", prompt=text, echo=True, logprobs=3, max_tokens=0)
    choice = only.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and only.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx([logprobs[i - 1, ids[i]] for i in range(1, len(ids))], abs=1e-4)
    for i in range(1, len(ids)):  # keyed by text: tokens of the same text share an entry
        best = np.sort(logprobs[i - 1])[::-1][:3]
        assert max(lp.top_logprobs[i].values()) == pytest.approx(best[0], abs=1e-4)
        assert all(np.abs(best - v).min() < 1e-4 for v in lp.top_logprobs[i].values())
    # token ids, two prompts, then an answer of 3 tokens: the prompt part is the same scores
    both = client.completions.create(model="run-1", prompt=[ids, ids[:4]], echo=True, logprobs=1, max_tokens=3,
                                     temperature=0, logit_bias=NO_END)
    first, second = sorted(both.choices, key=lambda c: c.index)
    assert first.logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert len(first.logprobs.tokens) == len(ids) + 3 and len(second.logprobs.tokens) == 4 + 3
    assert first.text.startswith(sampler.tokenizer.decode(ids))
    assert both.usage.prompt_tokens == len(ids) + 4 and both.usage.completion_tokens == 6


def test_n_choices_draw_their_own_streams(client, sampler):
    prompt = "Write a poem."
    out = client.completions.create(model="run-1", prompt=prompt, n=3, seed=7, temperature=1.0, max_tokens=8,
                                    extra_body={"repetition_penalty": 1.0})
    settings = SamplingSettings(temperature=1.0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=8)
    ids = sampler.prompt_ids(prompt, "raw")
    refs = sampler.generate_ids([ids] * 3, settings, seed=7)  # rows 0, 1, 2 of seed 7
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [sampler.tokenizer.decode(r["ids"]) for r in refs]
    assert len(set(texts)) == 3
    streamed = client.completions.create(model="run-1", prompt=prompt, n=3, seed=7, temperature=1.0, max_tokens=8,
                                         stream=True, extra_body={"repetition_penalty": 1.0})
    pieces = ["", "", ""]
    for chunk in streamed:
        for c in chunk.choices:
            pieces[c.index] += c.text
    assert pieces == texts
    with pytest.raises(openai.BadRequestError, match="at most 4 answers at once"):
        client.completions.create(model="run-1", prompt=prompt, n=SLOTS + 1, max_tokens=2)


BAD = {  # raw JSON bodies: a lone surrogate cannot be written from Python's json
    "logit_bias key not an integer": ("/v1/completions", '{"prompt": "Hi", "logit_bias": {"\\u00b2": 1}}'),
    "logit_bias key huge": ("/v1/completions", '{"prompt": "Hi", "logit_bias": {"%s": 1}}' % ("9" * 5000)),
    "logit_bias outside the vocabulary": ("/v1/completions", '{"prompt": "Hi", "logit_bias": {"-3": 1}}'),
    "lone surrogate in a message": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
    "lone surrogate in a prompt": ("/v1/completions", '{"prompt": ["\\udfff"]}'),
    "lone surrogate in a stop": ("/v1/completions", '{"prompt": "Hi", "stop": ["\\ud800"]}'),
    "lone surrogate to tokenize": ("/tokenize", '{"prompt": "\\ud800"}'),
    "token id outside the vocabulary": ("/v1/completions", '{"prompt": [1, 99999]}'),
    "negative token id": ("/v1/completions", '{"prompt": [[1, -2]]}'),
    "empty token list": ("/v1/completions", '{"prompt": [[]]}'),
    "mixed prompt list": ("/v1/completions", '{"prompt": ["a", 3]}'),
    "n of zero": ("/v1/completions", '{"prompt": "Hi", "n": 0}'),
    "n as text": ("/v1/completions", '{"prompt": "Hi", "n": "two"}'),
    "max_tokens 0 without echo": ("/v1/completions", '{"prompt": "Hi", "max_tokens": 0}'),
    "negative max_tokens": ("/v1/completions", '{"prompt": "Hi", "max_tokens": -1}'),
    "stop of wrong type": ("/v1/completions", '{"prompt": "Hi", "stop": [1]}'),
    "logprobs too many": ("/v1/completions", '{"prompt": "Hi", "logprobs": 21}'),
    "messages not a list": ("/v1/chat/completions", '{"messages": "Hi"}'),
    "echo in a chat": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "echo": true}'),
    "body a list": ("/v1/completions", "[]"),
    "body null": ("/v1/completions", "null"),
    "invalid JSON": ("/v1/completions", '{"prompt": '),
    "invalid UTF-8": ("/v1/completions", b'{"prompt": "\xff\xfe"}'),
    "detokenize text": ("/detokenize", '{"tokens": "abc"}'),
}


def test_malformed_fields_get_400_and_the_connection_goes_on(http):
    """One keep-alive connection for every case; each 400 is followed by a served request."""
    for case, (path, body) in BAD.items():
        response = http.post(path, content=body if isinstance(body, bytes) else body.encode(),
                             headers={"content-type": "application/json"})
        assert response.status_code == 400, (case, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], case
        assert response.headers.get("connection") != "close", case
        ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200, (case, ok.text)


def test_bodies_over_the_limit_get_413(http):
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    response = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and "1048576 bytes" in response.json()["error"]["message"]
    chunked = http.post("/v1/completions", content=iter([big[:600_000], big[600_000:]]),  # no content-length
                        headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_long_prompts_are_tokenized_off_the_event_loop(server, http):
    """Two bodies just under the limit, tokenized at once (refused: far over the context), while
    the watcher's /health goes on answering."""
    text = "one two three four five six seven " * 29_000  # ~1 MB

    def post(_):
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
            return c.post("/v1/completions", json={"prompt": text})

    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, post(i))) for i in range(2)]
    results = [None, None]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_an_api_key_is_needed_but_for_health(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/tokenize"), ("GET", "/tokenizer_info")):
            response = httpx.request(method, f"{server}{path}", headers=headers, json={"prompt": "Hi"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def wait_idle(http, steps_before: int, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while (health := http.get("/health").json())["active"] and time.time() < deadline:
        time.sleep(0.05)
    return health


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_clients_that_give_up_free_their_slots(server, http, stream):
    """Every slot taken by a client asking for 600 tokens that leaves after 0.3 s (or after the
    first chunks): the slots are free again long before 600 steps (0.3 s is 60-100 steps of this
    model on a CPU, so the bound leaves room for a slow machine), and the next client is served."""
    before = http.get("/health").json()["steps"]

    def give_up(_):
        body = {"prompt": "Tell me a long story", "max_tokens": 600, "logit_bias": NO_END, "stream": stream}
        with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3) as c:
            try:
                with c.stream("POST", "/v1/completions", json=body) as response:
                    for i, _ in enumerate(response.iter_lines()):
                        if i == 4:
                            return
            except httpx.TimeoutException:
                return

    threads = [threading.Thread(target=give_up, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    health = wait_idle(http, before)
    assert health["active"] == 0 and health["steps"] - before < 200, health
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def scrape(http) -> dict:
    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_count_what_was_served(http):
    before = scrape(http)
    out = http.post("/v1/completions", json={"prompt": "Name a colour.", "max_tokens": 5, "n": 2,
                                             "logit_bias": NO_END}).json()
    bad = http.post("/v1/completions", json={"prompt": "Hi", "n": 0})
    after = scrape(http)
    delta = lambda name, **labels: after.get((name, tuple(sorted(labels.items()))), 0) - before.get(  # noqa: E731
        (name, tuple(sorted(labels.items()))), 0)
    assert bad.status_code == 400
    assert delta("lima_requests_total", path="/v1/completions", status="200") == 1
    assert delta("lima_requests_total", path="/v1/completions", status="400") == 1
    assert delta("lima_prompt_tokens_total") == out["usage"]["prompt_tokens"]
    assert delta("lima_completion_tokens_total") == out["usage"]["completion_tokens"] == 10
    assert delta("lima_time_to_first_token_seconds_count") == 2  # one per choice
    assert after[("lima_slots", ())] == SLOTS and after[("lima_slots_active", ())] == 0


def test_health_answered_within_a_second_throughout(watcher):
    assert len(watcher) > 20 and max(watcher) < 1.0, sorted(watcher)[-5:]

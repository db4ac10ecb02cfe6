"""Scoring answers with a judge model (lima_jax/evaluation, launch/judge.py).

The parts alone: verdicts read from token log-probabilities and from text, the two orders
combined, judge prompts as files, answers files paired by prompt, bootstrap intervals, the
reply cache, the backoff policy, the chart. Then the whole thing against `launch/serve.py`
serving a tiny checkpoint as the judge (a real OpenAI-compatible server), behind a real HTTP
proxy started here that counts the requests and can answer 503 first."""

import http.server
import json
import math
import os
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from lima_jax.evaluation import answers as answers_lib, stats, templates
from lima_jax.evaluation.cache import ReplyCache, cache_key
from lima_jax.evaluation.chart import preference_chart
from lima_jax.evaluation.client import JudgeSettings, backoff_seconds, retryable
from lima_jax.evaluation.verdicts import OrderVerdict, combine, read_likert, read_pairwise
from tests.conftest import ROOT, cpu_env
from tests.serving_fixtures import serve_py


def reply(text: str = "", tops: list[dict[str, float]] | None = None) -> dict:
    """A reply as the client stores it: generated tokens with their top alternatives."""
    if tops is None:
        return {"text": text, "tokens": None}
    tokens = [{"token": max(top, key=top.get), "logprob": max(top.values()), "top": [[t, lp] for t, lp in top.items()]}
              for top in tops]
    return {"text": text, "tokens": tokens}


# ---- verdicts ----

def test_pairwise_verdict_from_logprobs_sums_spellings_and_renormalises():
    top = {"\u25811": math.log(0.3), "1": math.log(0.1), "2": math.log(0.2), " 0": math.log(0.1), "The": math.log(0.3)}
    v = read_pairwise(reply("The", [top]))
    assert v.source == "logprobs" and v.winner == "first"
    assert v.probs == pytest.approx({"first": 4 / 7, "second": 2 / 7, "tie": 1 / 7})


def test_pairwise_verdict_at_the_first_token_offering_one():
    no_digit = {"Answer": -0.1, "The": -2.0}
    v = read_pairwise(reply("Answer 2", [no_digit, {"2": -0.5, "1": -1.5}]))
    assert v.winner == "second" and v.source == "logprobs"


def test_pairwise_verdict_from_text_when_no_logprobs():
    assert read_pairwise(reply("2")).winner == "second"
    assert read_pairwise(reply("Answer (1) is better.")).winner == "first"
    assert read_pairwise(reply(" 0 ")).winner == "tie"
    assert read_pairwise(reply("Answer (1) is better.")).source == "text"
    assert read_pairwise(reply("10 reasons, 3.2 stars")) == OrderVerdict(None, None, "unreadable")
    assert read_pairwise(reply("neither", [{"x": -0.1}])).source == "unreadable"  # logprobs without a verdict token


@pytest.mark.parametrize("ours_first,baseline_first,outcome", [
    ("first", "second", "win"),  # ours preferred in both orders
    ("second", "first", "loss"),
    ("first", "first", "tie"),  # position bias: each order prefers what it shows first
    ("second", "second", "tie"),
    ("first", "tie", "tie"),
    ("tie", "tie", "tie"),
    (None, "second", "tie"),  # an unreadable order never decides alone
])
def test_orders_combined(ours_first, baseline_first, outcome):
    v = combine(OrderVerdict(ours_first, None, "text"), OrderVerdict(baseline_first, None, "text"))
    assert v.outcome == outcome and v.p_ours is None


def test_combined_probabilities_are_aligned_to_ours():
    a = OrderVerdict("first", {"first": 0.7, "second": 0.2, "tie": 0.1}, "logprobs")
    b = OrderVerdict("second", {"first": 0.3, "second": 0.6, "tie": 0.1}, "logprobs")
    v = combine(a, b)
    assert v.outcome == "win"
    assert (v.p_ours, v.p_baseline, v.p_tie) == pytest.approx((0.65, 0.25, 0.1))


def test_likert_expected_grade_from_digit_probabilities_else_text():
    g = read_likert(reply("5", [{"5": math.log(0.5), "6": math.log(0.25), "\u25814": math.log(0.25), "x": -0.1}]))
    assert g.source == "logprobs" and g.grade == 5 and g.score == pytest.approx(5.0)
    g = read_likert(reply("I would say 4 out of 6"))
    assert (g.score, g.grade, g.source) == (4.0, 4, "text")
    assert read_likert(reply("7 or 0")).source == "unreadable"


# ---- prompts ----

def test_template_filled_once_and_a_file_without_a_placeholder_refused(tmp_path):
    text, source = templates.load_template("pairwise")
    assert source.endswith("prompts/pairwise.txt")
    filled = templates.render(text, question="Q?", answer_1="uses {answer_2} literally", answer_2="B")
    assert "uses {answer_2} literally" in filled and "{question}" not in filled and filled.count("B\n") >= 1
    bad = tmp_path / "mine.txt"
    bad.write_text("Compare {answer_1} and {answer_2}.")
    with pytest.raises(ValueError, match=r"mine.txt: the pairwise judge prompt lacks the placeholder\(s\) \{question\}"):
        templates.load_template("pairwise", str(bad))
    assert templates.conversation_text(["Hi", "Hello!", "Why?"]) == "User: Hi\n\nAssistant: Hello!\n\nUser: Why?"


# ---- answers files ----

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_answers_paired_by_prompt_not_position(tmp_path):
    ours = write_jsonl(tmp_path / "ours.jsonl", [
        {"line": 1, "conversations": ["A?"], "prompt": "A?", "answer": "a1"},
        {"line": 2, "conversations": ["B?"], "prompt": "B?", "answer": "b1"}])
    theirs = write_jsonl(tmp_path / "theirs.jsonl", [
        {"line": 2, "conversations": ["B?"], "prompt": "B?", "answer": "b2"},
        {"line": 1, "conversations": ["A?"], "prompt": "A?", "answer": "a2"}])
    pairs = answers_lib.pair_answers(answers_lib.read_answers(ours), answers_lib.read_answers(theirs), ours, theirs)
    assert [(a.answer, b.answer) for a, b in pairs] == [("a1", "a2"), ("b1", "b2")]
    assert pairs[1][1].where == f"{theirs}:1"


def test_answers_of_other_prompts_refused_naming_lines(tmp_path):
    ours = write_jsonl(tmp_path / "ours.jsonl", [{"conversations": ["A?"], "answer": "a"},
                                                  {"conversations": ["B?"], "answer": "b"}])
    theirs = write_jsonl(tmp_path / "theirs.jsonl", [{"conversations": ["A?"], "answer": "a"},
                                                      {"conversations": ["C?"], "answer": "c"}])
    with pytest.raises(ValueError, match=r"do not answer the same prompts \(1 only in the first, 1 only in the second\)"
                       r"(.|\n)*ours.jsonl:2: 'B\?' has no counterpart(.|\n)*theirs.jsonl:2: 'C\?'"):
        answers_lib.pair_answers(answers_lib.read_answers(ours), answers_lib.read_answers(theirs), ours, theirs)


def test_answers_file_errors_name_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"prompt": "A?", "answer": "a"}) + "\n" + '{"prompt": "B?", "ans')
    with pytest.raises(ValueError, match=r"a.jsonl:2: not a JSON object"):
        answers_lib.read_answers(str(path))
    path.write_text(json.dumps({"prompt": "A?", "text": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: no string 'answer' field"):
        answers_lib.read_answers(str(path))


def test_dev_samples_read_per_epoch(tmp_path):
    folder = tmp_path / "dev_samples"
    folder.mkdir()
    for epoch, step in ((10, 40), (2, 8)):
        write_jsonl(folder / f"epoch{epoch:02d}_step{step}.jsonl",
                    [{"epoch": epoch, "step": step, "prompt": "A?", "answer": f"e{epoch}"}])
    runs = answers_lib.read_dev_samples(str(tmp_path))
    assert [(r.epoch, r.step, r.answers[0].answer) for r in runs] == [(2, 8, "e2"), (10, 40, "e10")]
    assert not runs[0].answers[0].full_conversation  # paired by the prompt alone
    with pytest.raises(FileNotFoundError, match="no dev_samples folder"):
        answers_lib.read_dev_samples(str(tmp_path / "nowhere"))


def test_recommendation_is_the_best_kept_epoch_then_the_lower_dev_loss():
    from lima_jax.evaluation.selection import recommend

    def row(epoch, score, dev_loss, kept):
        return {"epoch": epoch, "step": epoch * 4, "score": {"mean": score}, "dev_loss": dev_loss,
                "checkpoint": f"ckpt/{epoch * 4}" if kept else None}

    table = [row(5, 0.6, 1.5, True), row(6, 0.6, 1.4, True), row(7, 0.9, 1.3, False), row(8, 0.2, 1.2, True)]
    assert recommend(table)["epoch"] == 6  # 7 scored best but its checkpoint is gone; 5 and 6 tie, 6 has lower loss
    assert recommend([row(7, 0.9, 1.3, False)])["note"].startswith("no epoch compared has a kept checkpoint")


# ---- statistics ----

def test_bootstrap_interval_is_seeded_and_covers_the_binomial_spread():
    outcomes = ["win"] * 120 + ["tie"] * 60 + ["loss"] * 120
    a = stats.share_with_ci(outcomes, "win", seed=3)
    assert a == stats.share_with_ci(outcomes, "win", seed=3)
    assert a["share"] == pytest.approx(0.4)
    half_width = 1.96 * math.sqrt(0.4 * 0.6 / 300)  # the normal approximation, for comparison
    assert a["ci"][0] == pytest.approx(0.4 - half_width, abs=0.012)
    assert a["ci"][1] == pytest.approx(0.4 + half_width, abs=0.012)
    assert stats.share_with_ci(["tie"] * 5, "tie")["ci"] == [1.0, 1.0]
    mean = stats.mean_with_ci(np.arange(1, 7), resamples=2000)
    assert mean["mean"] == 3.5 and mean["ci"][0] < 3.5 < mean["ci"][1]


# ---- cache and retries ----

def test_cache_persists_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    key = cache_key("judge", [{"role": "user", "content": "Q"}], {"temperature": 0.0})
    assert key == cache_key("judge", [{"role": "user", "content": "Q"}], {"temperature": 0.0})
    assert key != cache_key("judge", [{"role": "user", "content": "Q"}], {"temperature": 0.5})
    assert key != cache_key("other", [{"role": "user", "content": "Q"}], {"temperature": 0.0})
    cache = ReplyCache(str(path))
    cache.put(key, {"text": "1", "tokens": None})
    with path.open("a") as f:
        f.write('{"key": "abc", "reply": {"te')  # killed mid-write
    again = ReplyCache(str(path))
    assert again.get(key) == {"text": "1", "tokens": None} and len(again) == 1
    assert path.read_text().endswith("}\n")  # the torn line is gone: appending goes on cleanly
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"cache.jsonl:1: not a judge cache entry"):
        ReplyCache(str(path))


def test_backoff_doubles_with_jitter_within_limits():
    s = JudgeSettings(url="http://x", model="m", backoff_s=1.0, max_backoff_s=10.0)

    class Fixed:
        def __init__(self, value):
            self.value = value

        def random(self):
            return self.value

    assert [backoff_seconds(k, s, rng=Fixed(1.0)) for k in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert backoff_seconds(3, s, rng=Fixed(0.0)) == 2.0  # jitter: half the step at least
    assert backoff_seconds(1, s, retry_after=7.0, rng=Fixed(1.0)) == 7.0  # the server's Retry-After wins
    assert backoff_seconds(1, s, retry_after=99.0) == 10.0
    assert [retryable(c) for c in (429, 500, 503, 400, 401, 404)] == [True, True, True, False, False, False]


PARSE_IN_THREADS = """
import sys, threading
import openai
from lima_jax.evaluation.cache import ReplyCache
from lima_jax.evaluation.client import Judge, JudgeSettings
from openai.types.chat import ChatCompletion
if sys.argv[1] == "judge":
    Judge(JudgeSettings(url="http://127.0.0.1:9", model="m"), ReplyCache(sys.argv[2]), progress=False)
def models(cls=openai.BaseModel):
    for sub in cls.__subclasses__():
        yield sub
        yield from models(sub)
unbuilt = {m for m in models() if not m.__pydantic_complete__}
top = {"token": "1", "logprob": -0.1, "bytes": [49]}
reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
         "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "1"},
                      "logprobs": {"content": [dict(top, top_logprobs=[top])]}}]}
sys.setswitchinterval(1e-6)  # switch threads as often as possible: a race shows in most runs
start, failures = threading.Barrier(32), []
def parse():
    start.wait()
    try:
        ChatCompletion.construct(**reply)
    except Exception as e:
        failures.append(repr(e))
threads = [threading.Thread(target=parse) for _ in range(32)]
[t.start() for t in threads]
[t.join() for t in threads]
print(sum(m.__pydantic_complete__ for m in unbuilt), len(failures), failures[:1])
"""


@pytest.mark.parametrize("setup", ["judge", "none"])
def test_replies_parse_in_worker_threads(setup, tmp_path):
    """The judge's threads parse their first replies at the same moment; openai builds its reply models
    lazily, on first use, and pydantic's lazy build is not thread-safe, so a Judge builds them up front.
    Counted: the models built while threads parse (none may be, after a Judge; without one, some are,
    so the count can catch a regression) and the threads that failed."""
    env = {k: v for k, v in os.environ.items() if k != "DEFER_PYDANTIC_BUILD"}  # openai's default: lazy
    out = subprocess.run([sys.executable, "-c", PARSE_IN_THREADS, setup, str(tmp_path / "cache.jsonl")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    built_meanwhile, failed, first_failure = out.stdout.split(maxsplit=2)
    if setup == "judge":
        assert (built_meanwhile, failed) == ("0", "0"), first_failure
    else:
        assert int(built_meanwhile) > 0


# ---- chart ----

def test_preference_chart_is_a_png(tmp_path):
    path = tmp_path / "chart.png"
    preference_chart([("ours vs theirs", 0.5, 0.2, 0.3), ("ours vs other", 0.1, 0.1, 0.8)], str(path), "t", "ours")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > height > 100


# ---- against launch/serve.py ----

QUESTIONS = ["What is 2 plus 3?", "Spell the word \"apple\" backwards.", "Give me one tip about sleep.",
             "What is the opposite of hot?", "How many letters are in \"garden\"?", "Convert 2 km to meters."]
OURS = ["2 plus 3 is 5.", "\"apple\" backwards is \"elppa\".", "Go to bed at the same time every night.",
        "The opposite of hot is cold.", "\"garden\" has 6 letters.", "2 km is 2000 meters."]
THEIRS = ["It is 6.", "elpa", "Sleep is good.", "Warm.", "Five.", "20 meters."]


def answers_file(path, answers) -> str:
    """An answers file as `launch/sample.py --prompts` writes it (the row format of sampling/answers.py)."""
    settings = {"temperature": 0.7, "top_p": 0.9, "seed": 0, "max_new_tokens": 64}
    return write_jsonl(path, [{"line": i + 1, "conversations": [q], "prompt": q, "answer": a, "prompt_tokens": 9,
                               "answer_tokens": 9, "stopped": True, "settings": settings}
                              for i, (q, a) in enumerate(zip(QUESTIONS, answers))])


def build_judge_checkpoint(path) -> str:
    """A tiny random LLaMA (configs/tiny.py's demo tokenizer) tilted to answer with a digit: the
    output head's digit columns get a large weight on one direction that the end-of-turn
    token's embedding (the last token a chat model reads) sets, plus random weights on the
    rest, and attention carries the prompt into the last position. Its first token is then
    a verdict digit whose probabilities depend on the prompt: readable from logprobs and text,
    with no training."""
    import jax
    import sentencepiece as spm

    from lima_jax import model_store
    from lima_jax.config import model_config
    from lima_jax.data.demo import DEMO_PIECES, build_demo_tokenizer
    from lima_jax.model import init_params
    from tests.tiny_run import tiny_config

    config = tiny_config()
    config.model.update(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=768)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    cfg = model_config(config)
    params = jax.tree_util.tree_map(np.array, init_params(cfg, jax.random.key(0)))
    digits = [spm.SentencePieceProcessor(model_file=build_demo_tokenizer()).piece_to_id(d) for d in "0123456"]
    rng = np.random.default_rng(0)
    params["embed"] *= 10.0
    params["embed"][DEMO_PIECES, 0] = 10.0  # EOT = DEMO_PIECES
    params["layers"]["attn"]["wv"] *= 10.0
    params["layers"]["attn"]["wo"] *= 10.0
    params["lm_head"][0, digits] = 2.0
    params["lm_head"][1:, digits] = rng.normal(0.0, 10.0, (cfg.dim - 1, len(digits)))
    meta = model_store.CheckpointMeta(model=cfg, config=json.loads(config.to_json_best_effort()))
    return str(model_store.save_params(path, params, meta))


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory) -> str:
    return build_judge_checkpoint(tmp_path_factory.mktemp("judge_ckpt") / "judge")


@pytest.fixture(scope="module")
def judge_server(judge_checkpoint, tmp_path_factory):
    """The URL of launch/serve.py serving the tiny judge (one CPU device, 8 slots), stopped after the module."""
    folder = tmp_path_factory.mktemp("judge")
    ckpt = judge_checkpoint
    env = cpu_env(1, fast_compile=True)  # a tiny judge: its decode steps are short, its compiles many
    with serve_py(ckpt, folder / "serve.log", "--slots", "8", "--model_name", "tiny-judge", env=env) as url:
        yield url


class JudgeProxy:
    """A real HTTP server in front of the judge: forwards every request, counts the chat
    completions forwarded, and answers 503 instead to the next `fail_next` of them, or to
    every one once `fail_after` have been forwarded (an outage in the middle of a run)."""

    def __init__(self, upstream: str):
        self.upstream, self.forwarded, self.failed = upstream, 0, 0
        self.fail_next, self.fail_after = 0, None
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if proxy._should_fail():
                    self._send(503, json.dumps({"error": {"message": "overloaded", "type": "server_error"}}).encode())
                    return
                request = urllib.request.Request(proxy.upstream + self.path, data=body, method="POST",
                                                 headers={"content-type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        self._send(response.status, response.read())
                except urllib.error.HTTPError as e:
                    self._send(e.code, e.read())

            def _send(self, status: int, data: bytes):
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _should_fail(self) -> bool:
        with self._lock:
            if self.fail_next > 0 or (self.fail_after is not None and self.forwarded >= self.fail_after):
                self.fail_next = max(self.fail_next - 1, 0)
                self.failed += 1
                return True
            self.forwarded += 1
            return False

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(judge_server):
    p = JudgeProxy(judge_server)
    yield p
    p.close()


def judge_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}  # a local server needs no key
    return subprocess.run([sys.executable, str(ROOT / "launch" / "judge.py"), *args, "--judge_model", "tiny-judge",
                           "--noprogress", "--backoff_s", "0.01"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def judge_for(url: str, cache_path, **settings):
    from lima_jax.evaluation.client import Judge

    return Judge(JudgeSettings(url=url, model="tiny-judge", backoff_s=0.01, **settings), ReplyCache(str(cache_path)),
                 progress=False)


def test_pairwise_counts_add_up_and_a_rerun_sends_nothing(proxy, tmp_path):
    ours, theirs = answers_file(tmp_path / "ours.jsonl", OURS), answers_file(tmp_path / "theirs.jsonl", THEIRS)
    out = tmp_path / "judged"
    args = ["pairwise", "--answers", ours, "--baseline", theirs, "--judge_url", proxy.url, "--out", str(out)]
    first = judge_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert summary["wins"] + summary["ties"] + summary["losses"] == summary["prompts"] == len(rows) == len(QUESTIONS)
    assert [r["outcome"] for r in rows].count("win") == summary["wins"]
    assert summary["verdict_sources"] == {"logprobs": 2 * len(QUESTIONS)}  # read from the served top_logprobs
    assert all(r["p_ours"] + r["p_tie"] + r["p_baseline"] == pytest.approx(1.0) for r in rows)
    assert sum(summary["shares"][k]["share"] for k in ("wins", "ties", "losses")) == pytest.approx(1.0)
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert proxy.forwarded == 2 * len(QUESTIONS) and summary["requests"]["sent"] == 2 * len(QUESTIONS)
    assert "| ours vs theirs | 6 |" in first.stdout

    again = judge_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert proxy.forwarded == 2 * len(QUESTIONS)  # nothing reached the server
    assert f"0 requests sent (0 retries), {2 * len(QUESTIONS)} answered from" in again.stdout
    assert json.loads((out / "summary.json").read_text())["wins"] == summary["wins"]


def test_answers_judged_against_themselves_come_out_even(proxy, tmp_path):
    from lima_jax.evaluation.pairwise import run_pairwise

    ours = answers_file(tmp_path / "ours.jsonl", OURS)
    judge = judge_for(proxy.url, tmp_path / "cache.jsonl")
    summary = run_pairwise(judge, ours, ours, str(tmp_path / "out"), resamples=200)
    assert summary["wins"] == summary["losses"] and summary["prompts"] == len(QUESTIONS)
    assert summary["ties"] == len(QUESTIONS)  # each prompt cancels on its own: the same request in both orders
    rows = [json.loads(line) for line in (tmp_path / "out" / "verdicts.jsonl").read_text().splitlines()]
    # the judge does prefer a position: without the second order these would be wins or losses
    assert any(r["ours_first"]["winner"] in ("first", "second") for r in rows)
    assert judge.sent == len(QUESTIONS)  # both orders are one identical request


def test_503s_are_retried(proxy, tmp_path):
    from lima_jax.evaluation.likert import run_likert

    ours = answers_file(tmp_path / "ours.jsonl", OURS)
    proxy.fail_next = 3
    judge = judge_for(proxy.url, tmp_path / "cache.jsonl", concurrency=2)
    summary = run_likert(judge, ours, str(tmp_path / "out"), resamples=200)
    assert proxy.failed == 3 and judge.retries == 3 and judge.sent == len(QUESTIONS) + 3
    assert summary["graded"] == len(QUESTIONS) and summary["verdict_sources"] == {"logprobs": len(QUESTIONS)}
    assert 1 <= summary["mean"]["mean"] <= 6 and sum(summary["distribution"].values()) == len(QUESTIONS)


def test_an_outage_stops_the_run_and_a_rerun_resumes(proxy, tmp_path):
    ours = answers_file(tmp_path / "ours.jsonl", OURS)
    out = tmp_path / "likert"
    args = ["likert", "--answers", ours, "--judge_url", proxy.url, "--out", str(out), "--concurrency", "1",
            "--max_attempts", "2", "--nologprobs", "--max_tokens", "1"]
    proxy.fail_after = 4
    failed = judge_cli(*args)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "failed 2 times, last: HTTP 503" in failed.stderr and "4 replies are cached" in failed.stderr
    assert not (out / "summary.json").exists()
    proxy.fail_after = None
    resumed = judge_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert proxy.forwarded == len(QUESTIONS)  # 4 before the outage, the other 2 after
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict_sources"] == {"text": len(QUESTIONS)}  # no logprobs asked: the digit in the text
    assert summary["graded"] == len(QUESTIONS)


def test_select_recommends_a_kept_checkpoint(proxy, tmp_path):
    workdir = tmp_path / "run"
    (workdir / "dev_samples").mkdir(parents=True)
    for epoch, answers in ((5, THEIRS), (6, OURS), (7, [a + " Hope this helps!" for a in OURS])):
        write_jsonl(workdir / "dev_samples" / f"epoch{epoch:02d}_step{epoch * 4}.jsonl",
                    [{"epoch": epoch, "step": epoch * 4, "prompt": q, "answer": a, "answer_tokens": 5, "stopped": True}
                     for q, a in zip(QUESTIONS[:3], answers)])
        (workdir / "checkpoints" / str(epoch * 4)).mkdir(parents=True, exist_ok=epoch != 7)
    write_jsonl(workdir / "metrics.jsonl", [{"step": e * 4, "epoch": e, "dev_loss": 2.0 - e / 10} for e in (5, 6, 7)])
    (workdir / "checkpoints" / "28").rmdir()  # epoch 7's checkpoint was not kept
    out = tmp_path / "select"
    done = judge_cli("select", "--workdir", str(workdir), "--judge_url", proxy.url, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    table = {row["epoch"]: row for row in summary["table"]}
    assert sorted(table) == [5, 6, 7] and all(r["meetings"] == 6 for r in table.values())  # 2 opponents x 3 prompts
    assert sum(r["wins"] for r in table.values()) == sum(r["losses"] for r in table.values())  # every meeting mirrored
    assert table[7]["checkpoint"] is None and table[6]["dev_loss"] == pytest.approx(1.4)
    assert summary["recommended"]["epoch"] in (5, 6)
    assert summary["recommended"]["checkpoint"] == str(workdir / "checkpoints" / str(summary["recommended"]["epoch"] * 4))
    assert proxy.forwarded == 3 * 3 * 2  # 3 meetings x 3 prompts x 2 orders
    assert "**recommended**" in done.stdout


# ---- baseline answers from an endpoint (sample.py --endpoint) ----

def test_endpoint_answers_equal_the_checkpoints(proxy, judge_checkpoint, tmp_path):
    """`sample.py --endpoint` against serve.py writes the file `sample.py --checkpoint` writes on
    the same checkpoint, greedy (its `answer_file`, run here; the rows' settings record differs only
    in where the answers came from); 503s are retried; an interrupted file resumed with --resume is
    finished from the reply cache sample.py left, and ends as the uninterrupted one."""
    from lima_jax.sampling import SamplingSettings
    from lima_jax.sampling.endpoint import answer_file_at_endpoint
    from lima_jax.sampling.sampler import answer_file, load_sampler

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"conversations": [q]} for q in QUESTIONS] +
                          [{"conversations": [QUESTIONS[0], OURS[0], "And 3 plus 4?"]}])
    settings = SamplingSettings(greedy=True, max_new_tokens=12, repetition_penalty=30.0)  # varied digits and words
    sampler = load_sampler(judge_checkpoint, mesh_overrides={"data": 8})[0]  # this process has 8 devices
    answer_file(sampler, prompts, str(tmp_path / "local.jsonl"), settings, progress=False)
    proxy.fail_next = 2
    output = tmp_path / "remote.jsonl"
    args = ["--endpoint", proxy.url, "--model", "tiny-judge", "--output", str(output), "--backoff_s", "0.01",
            "--prompts", prompts, "--greedy", "--max_new_tokens", "12", "--repetition_penalty", "30"]
    env = {k: v for k, v in cpu_env(1).items() if k != "OPENAI_API_KEY"}
    remote = subprocess.run([sys.executable, str(ROOT / "launch" / "sample.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert remote.returncode == 0, remote.stderr[-3000:]
    prompts_count = len(QUESTIONS) + 1
    assert proxy.failed == 2 and proxy.forwarded == prompts_count
    assert f"{prompts_count + 2} requests sent (2 retries)" in remote.stdout  # sent counts every try

    local_rows = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    remote_text = output.read_text()
    remote_rows = [json.loads(line) for line in remote_text.splitlines()]
    assert len(local_rows) == prompts_count and len({r["answer"] for r in local_rows}) > 2
    for a, b in zip(local_rows, remote_rows, strict=True):
        source = {k: a["settings"].pop(k) for k in ("format", "stop_ids")}
        assert b["settings"].pop("model") == "tiny-judge" and source["format"] == "lima"
        assert a == b
    local_answers = answers_lib.read_answers(str(tmp_path / "local.jsonl"))  # they pair in judge.py, by prompt
    assert len(answers_lib.pair_answers(local_answers, answers_lib.read_answers(str(output)), "local", "remote")) == 7

    output.write_text("".join(remote_text.splitlines(keepends=True)[:3]) + remote_text.splitlines()[3][:20])  # killed
    client = judge_for(proxy.url, f"{output}.cache.jsonl", role="endpoint")  # the cache sample.py wrote
    summary = answer_file_at_endpoint(client, prompts, str(output), settings, resume=True, progress=False)
    assert (summary["resumed"], summary["sent"], summary["answered_from_cache"]) == (3, 0, prompts_count - 3)
    assert proxy.forwarded == prompts_count and output.read_text() == remote_text


def test_a_run_with_train_select_judges_its_kept_epochs(proxy, tmp_path, monkeypatch):
    """config.train.select: a tiny run judged at its end by serve.py (through the proxy), on the
    answers of its kept epochs to every dev prompt, not only the `sample_dev_prompts` first."""
    from lima_jax.train import loop
    from tests.tiny_run import tiny_config

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"conversations": [q, a]} for q, a in zip(QUESTIONS, OURS)])
    config = tiny_config(epochs=3, keep_epochs=(2, 3), eval_every_epoch=True, sample_dev_prompts=1,
                         sample_max_new_tokens=4, select=True, judge_url=proxy.url, judge_model="tiny-judge")
    config.model.update(dim=32, n_layers=1, ffn_dim=64)
    config.data.update(seq_len=128, dev_path=dev)
    workdir = tmp_path / "run"
    loop.train(config, workdir)

    samples = sorted((workdir / "dev_samples").glob("*.jsonl"))
    assert len(samples) == 3 and all(len(p.read_text().splitlines()) == len(QUESTIONS) for p in samples)
    summary = json.loads((workdir / "select" / "summary.json").read_text())
    assert summary["epochs"] == [2, 3] and summary["judge_model"] == "tiny-judge"  # the kept epochs, not 1
    table = {row["epoch"]: row for row in summary["table"]}
    assert all(row["meetings"] == len(QUESTIONS) for row in table.values())  # one opponent x every dev prompt
    assert table[2]["wins"] == table[3]["losses"] and table[2]["ties"] == table[3]["ties"]
    assert 0 < proxy.forwarded <= 2 * len(QUESTIONS)  # both orders of each prompt (identical answers: one request)
    best = summary["recommended"]
    assert best["epoch"] in (2, 3) and best["checkpoint"] == str(workdir / "checkpoints" / str(best["step"]))
    assert len((workdir / "select" / "verdicts.jsonl").read_text().splitlines()) == len(QUESTIONS)

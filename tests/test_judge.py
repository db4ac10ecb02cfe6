"""Scoring answers with a judge model (lima_jax/evaluation, launch/judge.py).

The parts alone: verdicts read from token log-probabilities and from text, the two orders
combined, judge prompts as files, answers files paired by prompt, bootstrap intervals, the
reply cache, the backoff policy, the chart. Then the whole thing against `launch/serve.py`
serving a tiny checkpoint as the judge (a real OpenAI-compatible server), behind a real HTTP
proxy started here that counts the requests and can answer 503 first."""

import json
import math
import struct

import numpy as np
import pytest

from lima_jax.evaluation import answers as answers_lib, stats, templates
from lima_jax.evaluation.cache import ReplyCache, cache_key
from lima_jax.evaluation.chart import preference_chart
from lima_jax.evaluation.client import JudgeSettings, backoff_seconds, retryable
from lima_jax.evaluation.verdicts import OrderVerdict, combine, read_likert, read_pairwise


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


# ---- chart ----

def test_preference_chart_is_a_png(tmp_path):
    path = tmp_path / "chart.png"
    preference_chart([("ours vs theirs", 0.5, 0.2, 0.3), ("ours vs other", 0.1, 0.1, 0.8)], str(path), "t", "ours")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > height > 100

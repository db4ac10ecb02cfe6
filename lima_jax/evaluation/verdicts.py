"""Reading a verdict from a judge reply: from the token log-probabilities when the endpoint
returns them (the probability of each verdict token, renormalised over the verdict tokens, as
AlpacaEval does), otherwise from the text; and combining the two orders of a pairwise question.

Pairwise: the judge answers "1" (the first answer is better), "2" (the second) or "0" (equal).
Each prompt is asked twice, ours first and baseline first, and the two verdicts are combined:
  win   both orders prefer ours
  loss  both orders prefer the baseline
  tie   anything else: a tie in either order, the orders disagree (position bias), or an order
        whose verdict cannot be read (counted separately as unreadable)
so an answers file judged against itself comes out exactly even.

Likert: the judge answers a digit 1-6; the grade is the expected digit under its probabilities
(or the digit in the text), the distribution counts the most likely digit."""

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence

PAIRWISE_CHOICES = {"1": "first", "2": "second", "0": "tie"}
LIKERT_CHOICES = ("1", "2", "3", "4", "5", "6")
_MARKERS = "\u2581\u0120"  # the word-start marks of SentencePiece and GPT-2 byte BPE tokens
_PAIRWISE_TEXT = re.compile(r"(?<![\d.])[012](?![\d.])")
_LIKERT_TEXT = re.compile(r"(?<![\d.])[1-6](?![\d.])")


def token_text(token: str) -> str:
    """A token as the verdict it may spell: without spaces or word-start marks."""
    return token.strip().strip(_MARKERS).strip()


def choice_probs(reply: Mapping, choices: Sequence[str]) -> dict[str, float] | None:
    """The probabilities of `choices` at the first generated token whose alternatives include one
    of them, renormalised over the choices; None when the reply has no log-probabilities or no
    token offers a choice."""
    for position in reply.get("tokens") or ():
        alternatives = {tok: lp for tok, lp in position["top"]}
        alternatives.setdefault(position["token"], position["logprob"])  # the chosen token, if not in the top list
        mass = dict.fromkeys(choices, 0.0)
        for tok, logprob in alternatives.items():
            text = token_text(tok)
            if text in mass and logprob is not None:
                mass[text] += math.exp(logprob)
        total = sum(mass.values())
        if total > 0:
            return {c: p / total for c, p in mass.items()}
    return None


@dataclasses.dataclass(frozen=True)
class OrderVerdict:
    """One order's verdict: 'first', 'second', 'tie', or None when it cannot be read."""

    winner: str | None
    probs: dict[str, float] | None  # first/second/tie, from log-probabilities
    source: str  # 'logprobs', 'text' or 'unreadable'


def read_pairwise(reply: Mapping) -> OrderVerdict:
    probs = choice_probs(reply, tuple(PAIRWISE_CHOICES))
    if probs is not None:
        named = {PAIRWISE_CHOICES[c]: p for c, p in probs.items()}
        return OrderVerdict(max(named, key=named.get), named, "logprobs")
    match = _PAIRWISE_TEXT.search(reply.get("text") or "")
    if match:
        return OrderVerdict(PAIRWISE_CHOICES[match.group(0)], None, "text")
    return OrderVerdict(None, None, "unreadable")


@dataclasses.dataclass(frozen=True)
class PairVerdict:
    outcome: str  # 'win', 'tie' or 'loss', for our answer
    ours_first: OrderVerdict
    baseline_first: OrderVerdict
    p_ours: float | None  # the probability that ours is better, averaged over both orders (logprobs only)
    p_tie: float | None
    p_baseline: float | None


def combine(ours_first: OrderVerdict, baseline_first: OrderVerdict) -> PairVerdict:
    """Both orders' verdicts as one outcome (see the module docstring for the rule)."""
    as_ours = {"first": "ours", "second": "baseline", "tie": "tie", None: None}
    swapped = {"first": "baseline", "second": "ours", "tie": "tie", None: None}
    a, b = as_ours[ours_first.winner], swapped[baseline_first.winner]
    outcome = "win" if a == b == "ours" else "loss" if a == b == "baseline" else "tie"
    p_ours = p_tie = p_baseline = None
    if ours_first.probs and baseline_first.probs:
        p_ours = (ours_first.probs["first"] + baseline_first.probs["second"]) / 2
        p_baseline = (ours_first.probs["second"] + baseline_first.probs["first"]) / 2
        p_tie = (ours_first.probs["tie"] + baseline_first.probs["tie"]) / 2
    return PairVerdict(outcome, ours_first, baseline_first, p_ours, p_tie, p_baseline)


@dataclasses.dataclass(frozen=True)
class Grade:
    score: float | None  # the expected grade under the digits' probabilities, or the digit in the text
    grade: int | None  # the most likely digit (for the distribution)
    probs: dict[str, float] | None
    source: str  # 'logprobs', 'text' or 'unreadable'


def read_likert(reply: Mapping) -> Grade:
    probs = choice_probs(reply, LIKERT_CHOICES)
    if probs is not None:
        expected = sum(int(c) * p for c, p in probs.items())
        return Grade(expected, int(max(probs, key=probs.get)), probs, "logprobs")
    match = _LIKERT_TEXT.search(reply.get("text") or "")
    if match:
        return Grade(float(match.group(0)), int(match.group(0)), None, "text")
    return Grade(None, None, None, "unreadable")

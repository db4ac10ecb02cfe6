"""What a judge run leaves in its out dir and prints: `summary.json` (counts, shares with
bootstrap intervals), `verdicts.jsonl` (one row per prompt), the chart, and a markdown table."""

import collections
import json
from collections.abc import Sequence

from etils import epath

from lima_jax import storage
from lima_jax.evaluation import stats
from lima_jax.evaluation.client import Judge
from lima_jax.evaluation.verdicts import PairVerdict

SUMMARY, VERDICTS, CHART, CACHE = "summary.json", "verdicts.jsonl", "chart.png", "judge_cache.jsonl"
OUTCOME_VALUE = {"win": 1.0, "tie": 0.5, "loss": 0.0}  # the win rate counts a tie as half a win


def out_dir(out: str) -> epath.Path:
    folder = storage.path(out)
    if not storage.is_remote(folder):  # a bucket has no folders to create
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def judge_info(judge: Judge, template_source: str) -> dict:
    """Who judged, with what prompt and parameters, and how many requests this run sent."""
    s = judge.settings
    return {"judge_model": s.model, "judge_url": s.url, "prompt_file": template_source,
            "request_params": s.request_params(),
            "requests": {"sent": judge.sent, "retries": judge.retries, "answered_from_cache": judge.from_cache}}


def pairwise_stats(outcomes: Sequence[str], resamples: int = 10_000, seed: int = 0,
                   verdicts: Sequence[PairVerdict] = ()) -> dict:
    """Counts of the outcomes ('win', 'tie', 'loss'), their shares and the win rate, each with its
    bootstrap interval; with the `verdicts` behind them, the mean preference probability (when
    every verdict has log-probabilities) and where the verdicts were read from."""
    counts = collections.Counter(outcomes)
    kwargs = dict(resamples=resamples, seed=seed)
    result = {"prompts": len(outcomes), "wins": counts["win"], "ties": counts["tie"], "losses": counts["loss"],
              "shares": {name: stats.share_with_ci(outcomes, outcome, **kwargs)
                         for name, outcome in (("wins", "win"), ("ties", "tie"), ("losses", "loss"))},
              "win_rate": stats.mean_with_ci([OUTCOME_VALUE[o] for o in outcomes], **kwargs)}
    if verdicts and all(v.p_ours is not None for v in verdicts):
        result["preference_probability"] = stats.mean_with_ci([v.p_ours + v.p_tie / 2 for v in verdicts], **kwargs)
    if verdicts:
        orders = [o for v in verdicts for o in (v.ours_first, v.baseline_first)]
        result["verdict_sources"] = dict(collections.Counter(o.source for o in orders))
        # "first/first": the answer shown first won in both orders, the position bias the second order cancels
        result["order_verdicts"] = dict(collections.Counter(f"{v.ours_first.winner}/{v.baseline_first.winner}"
                                                            for v in verdicts).most_common())
    return result


def pair_row(verdict: PairVerdict, replies: tuple[dict, dict], ours_where: str, baseline_where: str, prompt: str
             ) -> dict:
    """A verdicts.jsonl row: the outcome, each order's verdict and the judge's raw text."""
    def order(o, reply):
        return {"winner": o.winner, "probs": o.probs, "source": o.source, "text": reply.get("text")}

    return {"ours": ours_where, "baseline": baseline_where, "prompt": prompt, "outcome": verdict.outcome,
            "p_ours": verdict.p_ours, "p_tie": verdict.p_tie, "p_baseline": verdict.p_baseline,
            "ours_first": order(verdict.ours_first, replies[0]),
            "baseline_first": order(verdict.baseline_first, replies[1])}


def write(folder: epath.Path, summary: dict, rows: Sequence[dict]) -> None:
    (folder / VERDICTS).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def percent_ci(entry: dict) -> str:
    low, high = entry["ci"]
    return f"{entry['share']:.1%} [{low:.1%}, {high:.1%}]"


def pairwise_table(rows: Sequence[tuple[str, dict]]) -> str:
    """A markdown table: one row per (label, pairwise_stats), shares with 95% intervals."""
    lines = ["| comparison | prompts | wins | ties | losses | win rate (ties half) |", "|---|---|---|---|---|---|"]
    for label, s in rows:
        rate = s["win_rate"]
        lines.append(f"| {label} | {s['prompts']} | {s['wins']} ({percent_ci(s['shares']['wins'])}) | "
                     f"{s['ties']} ({percent_ci(s['shares']['ties'])}) | "
                     f"{s['losses']} ({percent_ci(s['shares']['losses'])}) | "
                     f"{rate['mean']:.1%} [{rate['ci'][0]:.1%}, {rate['ci'][1]:.1%}] |")
    return "\n".join(lines)


def order_line(stats: dict) -> str:
    """How the two orders' verdicts (ours shown first / baseline shown first) combined."""
    orders = stats.get("order_verdicts", {})
    biased = orders.get("first/first", 0) + orders.get("second/second", 0)
    pairs = ", ".join(f"{k} {n}" for k, n in orders.items())
    return (f"verdicts per order (ours first/baseline first): {pairs}; {biased} of {stats['prompts']} prompts "
            f"preferred the same position in both orders (position bias, counted as ties)")

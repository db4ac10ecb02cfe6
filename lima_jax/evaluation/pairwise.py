"""`judge.py pairwise`: our answers against a baseline's, prompt by prompt, each prompt asked in
both orders; the outcome per prompt (win, tie, loss) and the paper's summary."""

import pathlib
from collections.abc import Sequence

from lima_jax.evaluation import report
from lima_jax.evaluation.answers import Answer, pair_answers, read_answers
from lima_jax.evaluation.chart import preference_chart
from lima_jax.evaluation.client import Judge
from lima_jax.evaluation.templates import conversation_text, load_template, render
from lima_jax.evaluation.verdicts import PairVerdict, combine, read_pairwise


def pair_messages(template: str, ours: Answer, baseline: Answer) -> tuple[list[dict], list[dict]]:
    """The judge's question with ours shown first, then with the baseline shown first."""
    question = conversation_text(ours.turns)

    def ask(first: str, second: str) -> list[dict]:
        return [{"role": "user", "content": render(template, question=question, answer_1=first, answer_2=second)}]

    return ask(ours.answer, baseline.answer), ask(baseline.answer, ours.answer)


def judge_pairs(judge: Judge, template: str, pairs: Sequence[tuple[Answer, Answer]], desc: str = "pairwise"
                ) -> tuple[list[PairVerdict], list[tuple[dict, dict]]]:
    """Each pair's verdict (both orders asked, combined) and the two replies behind it."""
    conversations = [m for ours, theirs in pairs for m in pair_messages(template, ours, theirs)]
    replies = judge.ask_all(conversations, desc)
    both = list(zip(replies[0::2], replies[1::2]))
    return [combine(read_pairwise(a), read_pairwise(b)) for a, b in both], both


def label(path: str, name: str | None) -> str:
    return name or pathlib.PurePosixPath(str(path)).stem


def run_pairwise(judge: Judge, answers_path: str, baseline_path: str, out: str, prompt_file: str | None = None,
                 name: str | None = None, baseline_name: str | None = None, resamples: int = 10_000,
                 seed: int = 0) -> dict:
    """Judge every prompt, write summary.json, verdicts.jsonl and chart.png to `out`; the summary."""
    pairs = pair_answers(read_answers(answers_path), read_answers(baseline_path), answers_path, baseline_path)
    template, template_source = load_template("pairwise", prompt_file)
    folder = report.out_dir(out)
    verdicts, replies = judge_pairs(judge, template, pairs)
    ours, theirs = label(answers_path, name), label(baseline_path, baseline_name)
    stats = report.pairwise_stats([v.outcome for v in verdicts], resamples, seed, verdicts)
    summary = {"mode": "pairwise", "answers": answers_path, "baseline": baseline_path, "name": ours,
               "baseline_name": theirs, **stats, **report.judge_info(judge, template_source),
               "verdicts": report.VERDICTS, "chart": report.CHART}
    rows = [report.pair_row(v, r, a.where, b.where, a.prompt) for v, r, (a, b) in zip(verdicts, replies, pairs)]
    report.write(folder, summary, rows)
    preference_chart([(f"{ours} vs {theirs}", *(stats["shares"][k]["share"] for k in ("wins", "ties", "losses")))],
                     str(folder / report.CHART), f"{ours} vs {theirs}: {len(pairs)} prompts, judge {judge.settings.model}",
                     ours=ours)
    summary["printed"] = report.pairwise_table([(f"{ours} vs {theirs}", stats)]) + "\n" + report.order_line(stats)
    return summary


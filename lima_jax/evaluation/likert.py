"""`judge.py likert`: each answer graded 1-6 for helpfulness (the paper's ablation metric): the
mean grade with its bootstrap interval and the distribution of grades."""

import collections

from lima_jax.evaluation import report, stats
from lima_jax.evaluation.answers import read_answers
from lima_jax.evaluation.chart import grade_chart
from lima_jax.evaluation.client import Judge
from lima_jax.evaluation.pairwise import label
from lima_jax.evaluation.templates import conversation_text, load_template, render
from lima_jax.evaluation.verdicts import read_likert


def run_likert(judge: Judge, answers_path: str, out: str, prompt_file: str | None = None, name: str | None = None,
               resamples: int = 10_000, seed: int = 0) -> dict:
    """Grade every answer, write summary.json, verdicts.jsonl and chart.png to `out`; the summary."""
    answers = read_answers(answers_path)
    template, template_source = load_template("likert", prompt_file)
    folder = report.out_dir(out)
    messages = [[{"role": "user", "content": render(template, question=conversation_text(a.turns), answer=a.answer)}]
                for a in answers]
    replies = judge.ask_all(messages, "likert")
    grades = [read_likert(r) for r in replies]
    scores = [g.score for g in grades if g.score is not None]
    distribution = collections.Counter(g.grade for g in grades if g.grade is not None)
    ours = label(answers_path, name)
    summary = {"mode": "likert", "answers": answers_path, "name": ours, "prompts": len(answers),
               "graded": len(scores), "unreadable": len(answers) - len(scores),
               "mean": stats.mean_with_ci(scores, resamples=resamples, seed=seed),
               "distribution": {str(g): distribution.get(g, 0) for g in range(1, 7)},
               "verdict_sources": dict(collections.Counter(g.source for g in grades)),
               **report.judge_info(judge, template_source), "verdicts": report.VERDICTS, "chart": report.CHART}
    rows = [{"answer": a.where, "prompt": a.prompt, "score": g.score, "grade": g.grade, "probs": g.probs,
             "source": g.source, "text": r.get("text")} for a, g, r in zip(answers, grades, replies)]
    report.write(folder, summary, rows)
    grade_chart({g: distribution.get(g, 0) for g in range(1, 7)}, str(folder / report.CHART),
                f"{ours}: helpfulness of {len(scores)} answers, judge {judge.settings.model}")
    summary["printed"] = likert_table(ours, summary)
    return summary


def likert_table(name: str, summary: dict) -> str:
    mean = summary["mean"]
    grades = " | ".join(str(summary["distribution"][str(g)]) for g in range(1, 7))
    return "\n".join(["| answers | graded | mean grade [95% CI] | 1 | 2 | 3 | 4 | 5 | 6 |",
                      "|---|---|---|---|---|---|---|---|---|",
                      f"| {name} | {summary['graded']} | {mean['mean']:.2f} [{mean['ci'][0]:.2f}, {mean['ci'][1]:.2f}] | "
                      f"{grades} |"])

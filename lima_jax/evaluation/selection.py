"""`judge.py select`: the checkpoint among a run's epochs, chosen from their dev answers
(`WORKDIR/dev_samples/`), the choice the paper made by hand among epochs 5-10.

Without a baseline, every epoch meets every other (round robin, each meeting asked in both
orders); with `--baseline FILE`, each epoch meets that file's answers. An epoch's score is its
win rate over all its meetings (ties count half). The recommendation is the best-scoring epoch
whose checkpoint was kept (ties broken by the lower dev loss, then the earlier epoch)."""

import itertools
import json

from lima_jax import storage
from lima_jax.evaluation import report
from lima_jax.evaluation.answers import EpochAnswers, pair_answers, read_answers, read_dev_samples
from lima_jax.evaluation.chart import preference_chart
from lima_jax.evaluation.client import Judge
from lima_jax.evaluation.pairwise import judge_pairs, label
from lima_jax.evaluation.templates import load_template
from lima_jax.evaluation.verdicts import PairVerdict

MIRROR = {"win": "loss", "loss": "win", "tie": "tie"}


def run_select(judge: Judge, workdir: str, out: str, baseline_path: str | None = None,
               epochs: list[int] | None = None, prompt_file: str | None = None, resamples: int = 10_000,
               seed: int = 0) -> dict:
    """Judge the epochs' dev answers, write summary.json (the table and the recommendation),
    verdicts.jsonl and chart.png to `out`; the summary."""
    found = read_dev_samples(workdir)
    missing = sorted(set(epochs or ()) - {e.epoch for e in found})
    if missing:
        raise ValueError(f"{workdir}/dev_samples has no answers of epoch(s) {missing}; it has "
                         f"{[e.epoch for e in found]}")
    runs = [e for e in found if not epochs or e.epoch in epochs]
    if len(runs) < (1 if baseline_path else 2):
        raise ValueError(f"{workdir}/dev_samples: {len(runs)} epoch(s) to compare{' of ' + str(epochs) if epochs else ''};"
                         f" need two, or one and --baseline")
    template, template_source = load_template("pairwise", prompt_file)
    folder = report.out_dir(out)
    meetings = _meetings(runs, baseline_path)
    verdicts, replies = judge_pairs(judge, template, [p for _, _, pairs in meetings for p in pairs], "select")
    outcomes, rows = _tally(runs, meetings, verdicts, replies)
    table = _table(workdir, runs, outcomes, resamples, seed)
    best = recommend(table)
    opponent = label(baseline_path, None) if baseline_path else "the other epochs"
    summary = {"mode": "select", "workdir": workdir, "baseline": baseline_path, "epochs": [e.epoch for e in runs],
               "opponent": opponent, "table": table, "recommended": best,
               **report.judge_info(judge, template_source), "verdicts": report.VERDICTS, "chart": report.CHART}
    report.write(folder, summary, rows)
    preference_chart([(f"epoch {r['epoch']}", r["shares"]["wins"]["share"], r["shares"]["ties"]["share"],
                       r["shares"]["losses"]["share"]) for r in table], str(folder / report.CHART),
                     f"each epoch's dev answers against {opponent}, judge {judge.settings.model}", ours="")
    summary["printed"] = select_table(table, best)
    return summary


def _meetings(runs: list[EpochAnswers], baseline_path: str | None) -> list[tuple[int, int | None, list]]:
    """(epoch, opponent epoch or None for the baseline, paired answers) for every meeting."""
    if baseline_path:
        baseline = read_answers(baseline_path)
        return [(r.epoch, None, pair_answers(r.answers, baseline, r.path, baseline_path)) for r in runs]
    return [(a.epoch, b.epoch, pair_answers(a.answers, b.answers, a.path, b.path))
            for a, b in itertools.combinations(runs, 2)]


def _tally(runs, meetings, verdicts: list[PairVerdict], replies) -> tuple[dict[int, list[str]], list[dict]]:
    """Each epoch's outcomes over all its meetings (the second epoch of a meeting gets the mirror
    image), and the verdicts.jsonl rows."""
    outcomes = {r.epoch: [] for r in runs}
    rows, i = [], 0
    for epoch, other, pairs in meetings:
        for a, b in pairs:
            v = verdicts[i]
            outcomes[epoch].append(v.outcome)
            if other is not None:
                outcomes[other].append(MIRROR[v.outcome])
            rows.append({"epoch": epoch, "opponent": other if other is not None else "baseline",
                         **report.pair_row(v, replies[i], a.where, b.where, a.prompt)})
            i += 1
    return outcomes, rows


def _table(workdir: str, runs: list[EpochAnswers], outcomes: dict[int, list[str]], resamples: int, seed: int
           ) -> list[dict]:
    dev_loss = _dev_losses(workdir)
    table = []
    for r in runs:
        s = report.pairwise_stats(outcomes[r.epoch], resamples, seed)
        checkpoint = storage.path(workdir) / "checkpoints" / str(r.step)
        table.append({"epoch": r.epoch, "step": r.step, "meetings": s["prompts"], "wins": s["wins"], "ties": s["ties"],
                      "losses": s["losses"], "shares": s["shares"], "score": s["win_rate"],
                      "dev_loss": dev_loss.get(r.epoch), "checkpoint": str(checkpoint) if checkpoint.exists() else None})
    return table


def _dev_losses(workdir: str) -> dict[int, float]:
    metrics = storage.path(workdir) / "metrics.jsonl"
    if not metrics.exists():
        return {}
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {r["epoch"]: r["dev_loss"] for r in rows if "epoch" in r and "dev_loss" in r}


def recommend(table: list[dict]) -> dict:
    """The best-scoring epoch with a kept checkpoint (or, if none was kept, the best of all)."""
    kept = [r for r in table if r["checkpoint"]] or table
    best = max(kept, key=lambda r: (r["score"]["mean"], -(r["dev_loss"] if r["dev_loss"] is not None else 0.0),
                                    -r["epoch"]))
    note = "" if best["checkpoint"] else "no epoch compared has a kept checkpoint (train.keep_epochs)"
    return {"epoch": best["epoch"], "step": best["step"], "checkpoint": best["checkpoint"], "score": best["score"],
            "note": note}


def select_table(table: list[dict], best: dict) -> str:
    lines = ["| epoch | step | meetings | wins | ties | losses | score (win rate) [95% CI] | dev loss | checkpoint |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        score, loss = r["score"], f"{r['dev_loss']:.4f}" if r["dev_loss"] is not None else "-"
        mark = " **recommended**" if r["epoch"] == best["epoch"] else ""
        lines.append(f"| {r['epoch']}{mark} | {r['step']} | {r['meetings']} | {r['wins']} | {r['ties']} | {r['losses']} | "
                     f"{score['mean']:.1%} [{score['ci'][0]:.1%}, {score['ci'][1]:.1%}] | {loss} | "
                     f"{'kept' if r['checkpoint'] else 'not kept'} |")
    return "\n".join(lines)

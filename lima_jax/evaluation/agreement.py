"""`judge.py agreement`: the LIMA paper's tie-discounted accuracy (section 3, inter-annotator
agreement) between human annotators and between the judge and the humans: one point when two
verdicts on a prompt agree, half a point when exactly one of them is a tie, none otherwise,
averaged over the prompts both gave a verdict on. Pooled figures sum the points and prompts of
every pair.

Humans: `launch/annotate.py`'s OUT/human.jsonl. The judge: `judge.py pairwise`'s
verdicts.jsonl (its `outcome` per prompt); its rows are matched to the humans' by prompt (the
k-th time a prompt occurs with the k-th), and flipped when the judge's --answers was the
humans' baseline."""

import itertools
import json
import os
from collections.abc import Mapping

from lima_jax import storage
from lima_jax.errors import DataError
from lima_jax.evaluation import report
from lima_jax.evaluation.human import SESSION, read_human, verdict_table

FLIPPED = {"win": "loss", "tie": "tie", "loss": "win"}
AGREEMENT = "summary.json"  # as every judge.py command writes (DESIGN.md)


def tie_discounted(a: str, b: str) -> float:
    """One pair of verdicts: 1 when they agree, 0.5 when exactly one is a tie, else 0."""
    if a == b:
        return 1.0
    return 0.5 if "tie" in (a, b) else 0.0


def pair_agreement(x: Mapping[int, str], y: Mapping[int, str]) -> dict:
    """The tie-discounted accuracy of two annotators over the prompts both judged."""
    shared = sorted(set(x) & set(y))
    points = sum(tie_discounted(x[i], y[i]) for i in shared)
    return {"prompts": len(shared), "points": points, "accuracy": points / len(shared) if shared else None}


def pooled(pairs: list[dict]) -> dict:
    prompts, points = sum(p["prompts"] for p in pairs), sum(p["points"] for p in pairs)
    return {"prompts": prompts, "points": points, "accuracy": points / prompts if prompts else None}


def judge_verdicts(judge_dir: str, human_dir: str, human_rows: list[dict]) -> dict[int, str]:
    """item -> the judge's outcome for the humans' A. Rows are matched by the line of A's file
    they answer (both name it `file:line`), and must then be on the same prompt."""
    folder = storage.path(judge_dir)
    path = folder / report.VERDICTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no judge verdicts (run `judge.py pairwise --out {judge_dir}` first)")
    flip = _judge_flipped(folder, storage.path(human_dir) / SESSION)
    items = {_line(row["answers"]): (row["item"], row["prompt"]) for row in human_rows}
    out = {}
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(text)
            line, prompt, outcome = _line(row["baseline" if flip else "ours"]), row["prompt"], row["outcome"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(f"{path}:{number}: not a pairwise verdict row (ours, baseline, prompt, outcome)") from None
        if line in items:
            item, human_prompt = items[line]
            if human_prompt != prompt:
                raise DataError(f"{path}:{number}: the judge's prompt {prompt[:60]!r} is not the humans' "
                                f"{human_prompt[:60]!r} on that line: the verdicts are on other answers files")
            out[item] = FLIPPED[outcome] if flip else outcome
    return out


def _line(where: str) -> int:
    """The line number of a `file:line` reference."""
    return int(where.rsplit(":", 1)[1])


def _judge_flipped(judge_folder, session_path) -> bool:
    """True when the judge compared the humans' baseline against their A (by file names)."""
    summary_path = judge_folder / report.SUMMARY
    if not (summary_path.exists() and session_path.exists()):
        return False
    summary, session = json.loads(summary_path.read_text()), json.loads(session_path.read_text())
    judged = (os.path.basename(summary.get("answers", "")), os.path.basename(summary.get("baseline", "")))
    return judged[0] != judged[1] and judged == (session.get("baseline"), session.get("answers"))


def agreement(human_dir: str, judge_dir: str | None = None) -> dict:
    """Per pair of annotators and pooled; per annotator against the judge and pooled (with a judge dir)."""
    rows = read_human(human_dir)
    if not rows:
        raise FileNotFoundError(f"{storage.path(human_dir) / 'human.jsonl'}: no human verdicts yet")
    table = verdict_table(rows)
    humans = [dict(a=a, b=b, **pair_agreement(table[a], table[b])) for a, b in itertools.combinations(sorted(table), 2)]
    result = {"human": human_dir, "annotators": {name: len(v) for name, v in sorted(table.items())},
              "between_annotators": {"pairs": humans, "pooled": pooled(humans)}}
    if judge_dir is not None:
        judge = judge_verdicts(judge_dir, human_dir, rows)
        vs = [dict(annotator=a, **pair_agreement(judge, table[a])) for a in sorted(table)]
        result.update(judge=judge_dir, judge_and_humans={"annotators": vs, "pooled": pooled(vs)})
    return result


def agreement_table(result: dict) -> str:
    """The figures as a markdown table."""
    def cell(entry):
        return "-" if entry["accuracy"] is None else f"{entry['accuracy']:.1%}"

    lines = ["| between | prompts | tie-discounted agreement |", "|---|---|---|"]
    for p in result["between_annotators"]["pairs"]:
        lines.append(f"| {p['a']} and {p['b']} | {p['prompts']} | {cell(p)} |")
    both = result["between_annotators"]["pooled"]
    lines.append(f"| **annotators, pooled** | {both['prompts']} | {cell(both)} |")
    if "judge_and_humans" in result:
        for p in result["judge_and_humans"]["annotators"]:
            lines.append(f"| judge and {p['annotator']} | {p['prompts']} | {cell(p)} |")
        both = result["judge_and_humans"]["pooled"]
        lines.append(f"| **judge and humans, pooled** | {both['prompts']} | {cell(both)} |")
    return "\n".join(lines)


def run_agreement(human_dir: str, judge_dir: str | None, out: str | None = None) -> dict:
    """Compute, write OUT/summary.json (default: into the human folder), print-ready table."""
    result = agreement(human_dir, judge_dir)
    folder = report.out_dir(out or human_dir)
    (folder / AGREEMENT).write_text(json.dumps(result, indent=2) + "\n")
    result["printed"] = agreement_table(result)
    result["written"] = str(folder / AGREEMENT)
    return result

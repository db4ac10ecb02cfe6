"""Scoring answers the way the LIMA paper did, with a judge model behind any OpenAI-compatible
endpoint: pairwise preference against a baseline (asked in both orders), a 6-point helpfulness
grade, and the choice of a checkpoint among epochs from their dev answers.

No model code here: the judge is reached through the official `openai` client only.

    templates.py  the judge prompts (editable files in prompts/)
    answers.py    answers files and dev_samples read and paired by prompt
    client.py     concurrent requests, retries with backoff, progress
    cache.py      the on-disk cache of judge replies (a rerun sends nothing)
    verdicts.py   verdicts read from token log-probabilities or from the text
    stats.py      bootstrap confidence intervals
    chart.py      the preference chart (PNG)
    pairwise.py, likert.py, selection.py   the three jobs of launch/judge.py
    report.py     summary.json, verdicts.jsonl and the printed table
    human.py      human verdicts: pairs, the order each annotator sees, human.jsonl
    annotate_app.py   the annotation page (FastAPI + pages/annotate.html) of launch/annotate.py
    agreement.py  tie-discounted agreement between annotators and with the judge (judge.py agreement)
"""

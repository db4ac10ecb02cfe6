"""Answers to judge: the files `launch/sample.py --prompts` writes (one JSON object a line with
`conversations`, `prompt`, `answer`, ...) and a training run's `dev_samples/epochNN_stepS.jsonl`
(`epoch`, `step`, `prompt`, `answer`); two files are paired by prompt, never by position."""

import collections
import dataclasses
import json
import re
from collections.abc import Sequence

from lima_jax import storage

DEV_SAMPLE_NAME = re.compile(r"epoch(\d+)_step(\d+)\.jsonl$")


@dataclasses.dataclass(frozen=True)
class Answer:
    turns: tuple[str, ...]  # the conversation the answer continues; (prompt,) when a file has only the prompt
    answer: str
    where: str  # "file:line", for messages
    full_conversation: bool = True  # False: the row had only its last `prompt` (dev_samples)

    @property
    def prompt(self) -> str:
        return self.turns[-1]


@dataclasses.dataclass(frozen=True)
class EpochAnswers:
    epoch: int
    step: int
    path: str
    answers: list[Answer]


def read_answers(path: str) -> list[Answer]:
    """Every row of an answers file; a row without a string `answer`, or without `conversations`
    or `prompt`, is refused with its file:line."""
    text = storage.path(path).read_text()
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            rows.append(_answer(line, f"{path}:{number}"))
    if not rows:
        raise ValueError(f"{path}: no answers in the file")
    return rows


def _answer(line: str, where: str) -> Answer:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg}); is the file complete?") from None
    if not isinstance(row, dict) or not isinstance(row.get("answer"), str):
        raise ValueError(f"{where}: no string 'answer' field: not an answers file row")
    turns = row.get("conversations")
    full = turns is not None
    if not full:
        turns = [row.get("prompt")]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: needs 'conversations' (a list of strings) or a string 'prompt'")
    return Answer(tuple(turns), row["answer"], where, full)


def pair_answers(ours: Sequence[Answer], theirs: Sequence[Answer], ours_path: str, theirs_path: str
                 ) -> list[tuple[Answer, Answer]]:
    """(ours, theirs) for each prompt, in our file's order. The files must answer the same
    prompts (as many times each); otherwise the mismatch is refused, naming lines of both."""
    by_turns = all(a.full_conversation for a in [*ours, *theirs])  # else by the last message alone
    key = (lambda a: a.turns) if by_turns else (lambda a: a.prompt)
    pool = collections.defaultdict(collections.deque)
    for a in theirs:
        pool[key(a)].append(a)
    pairs, unmatched = [], []
    for a in ours:
        if pool[key(a)]:
            pairs.append((a, pool[key(a)].popleft()))
        else:
            unmatched.append(a)
    extra = [a for queue in pool.values() for a in queue]
    if unmatched or extra:
        raise ValueError(_mismatch(unmatched, extra, ours_path, theirs_path))
    return pairs


def _mismatch(unmatched: list[Answer], extra: list[Answer], ours_path: str, theirs_path: str) -> str:
    lines = [f"{ours_path} and {theirs_path} do not answer the same prompts "
             f"({len(unmatched)} only in the first, {len(extra)} only in the second); pair files answering one "
             f"prompts file"]
    for a in (unmatched[:2] + extra[:2]):
        lines.append(f"{a.where}: {a.prompt[:80]!r} has no counterpart")
    return "\n".join(lines)


def read_dev_samples(workdir: str) -> list[EpochAnswers]:
    """A training run's dev answers, one entry per epoch, in epoch order."""
    folder = storage.path(workdir) / "dev_samples"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no dev_samples folder (train with train.sample_dev_prompts > 0)")
    epochs = []
    for path in folder.iterdir():
        match = DEV_SAMPLE_NAME.search(path.name)
        if match:
            epochs.append(EpochAnswers(int(match.group(1)), int(match.group(2)), str(path), read_answers(str(path))))
    if not epochs:
        raise FileNotFoundError(f"{folder}: no epochNN_stepS.jsonl files")
    return sorted(epochs, key=lambda e: e.epoch)

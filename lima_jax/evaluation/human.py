"""Human verdicts (`launch/annotate.py`): the pairs to annotate, the order each annotator sees
them in, and `DIR/human.jsonl`, appended one verdict at a time.

A verdict is stored as the judge's outcome for the first file (`--answers`, "A") against the
baseline ("B"): "win", "tie" or "loss", whatever side of the screen A was shown on; the row
keeps the screen side and the button too. Each annotator sees A on the left or the right by a
hash of the session's seed, their name and the prompt's position, so the order is random per
prompt and per annotator, and the same again after a restart. `DIR/session.json` records the
files (names and a digest of their prompts and answers) and the seed; a restart with other or
changed files is refused."""

import dataclasses
import datetime
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Sequence

from lima_jax import storage
from lima_jax.errors import ConfigError, DataError
from lima_jax.evaluation.answers import Answer, pair_answers, read_answers

HUMAN, SESSION = "human.jsonl", "session.json"
CHOICES = ("first", "tie", "second")  # the buttons: the answer shown first (left) is better, a tie, the second
OUTCOMES = ("win", "tie", "loss")  # A against B, as the judge's verdicts.jsonl
NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def a_shown_first(seed: str, annotator: str, item: int) -> bool:
    """Whether A's answer is shown first (left) to `annotator` at prompt `item`: a fair coin per
    (seed, annotator, item), stable across restarts."""
    digest = hashlib.sha256(f"{seed}\0{annotator}\0{item}".encode()).digest()
    return digest[0] % 2 == 0


def outcome_of(choice: str, a_first: bool) -> str:
    """The screen's choice as A's outcome: un-flipped from the order it was shown in."""
    if choice not in CHOICES:
        raise ValueError(f"choice {choice!r} is not one of {CHOICES}")
    if choice == "tie":
        return "tie"
    return "win" if (choice == "first") == a_first else "loss"


@dataclasses.dataclass(frozen=True)
class Shown:
    """One prompt as an annotator sees it: the conversation and the two answers in screen order."""

    item: int
    turns: tuple[str, ...]
    first: str
    second: str


class Annotation:
    """The pairs of two answers files, and every verdict given so far (thread-safe appends)."""

    def __init__(self, answers_path: str, baseline_path: str, out: str, seed: str | None = None):
        self.pairs: list[tuple[Answer, Answer]] = pair_answers(read_answers(answers_path), read_answers(baseline_path),
                                                               answers_path, baseline_path)
        self.folder = storage.path(out)
        if storage.is_remote(self.folder):
            raise ConfigError(f"--out {out}: human verdicts are appended to a local file; give a local folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.seed = self._session(answers_path, baseline_path, seed)
        self.path = self.folder / HUMAN
        self._lock = threading.Lock()
        self.verdicts: dict[str, dict[int, dict]] = {}  # annotator -> item -> row
        for row in read_human(str(self.folder), truncate_torn=True):
            self.verdicts.setdefault(row["annotator"], {}).setdefault(row["item"], row)

    def _session(self, answers_path: str, baseline_path: str, seed: str | None) -> str:
        """The session's seed; session.json is written on the first start and checked on every other."""
        shown = hashlib.sha256(json.dumps([(a.turns, a.answer, b.answer) for a, b in self.pairs]).encode()).hexdigest()
        files = {"answers": os.path.basename(answers_path), "baseline": os.path.basename(baseline_path),
                 "prompts": len(self.pairs), "sha256": shown}  # the files' names, prompts and answers
        path = self.folder / SESSION
        if path.exists():
            saved = json.loads(path.read_text())
            if {k: saved.get(k) for k in files} != files:
                raise ConfigError(f"{path}: this folder holds verdicts on {saved.get('answers')} vs "
                                  f"{saved.get('baseline')} ({saved.get('prompts')} prompts), not on "
                                  f"{files['answers']} vs {files['baseline']} ({files['prompts']} prompts) as "
                                  f"they are now (names, prompts and answers must be the same); pass another --out")
            if seed is not None and seed != saved["seed"]:
                raise ConfigError(f"{path}: the session's seed is {saved['seed']!r}, not --seed {seed!r}: the "
                                  f"order shown would change mid-annotation; leave --seed out to resume")
            return saved["seed"]
        seed = seed if seed is not None else secrets.token_hex(8)
        path.write_text(json.dumps(dict(files, seed=seed), indent=2) + "\n")
        return seed

    def next_item(self, annotator: str) -> int | None:
        """The first prompt `annotator` has not judged (file order), None when all are."""
        done = self.verdicts.get(annotator, {})
        return next((i for i in range(len(self.pairs)) if i not in done), None)

    def shown(self, annotator: str, item: int) -> Shown:
        a, b = self.pairs[item]
        first, second = (a, b) if a_shown_first(self.seed, annotator, item) else (b, a)
        return Shown(item, a.turns, first.answer, second.answer)

    def record(self, annotator: str, item: int, choice: str) -> dict | None:
        """Append `annotator`'s verdict on `item` to human.jsonl and return its row; None when that
        prompt already has their verdict (a form sent twice: the first counts)."""
        check_name(annotator)
        if not 0 <= item < len(self.pairs):
            raise ValueError(f"item {item} is not a prompt (0..{len(self.pairs) - 1})")
        a, b = self.pairs[item]
        a_first = a_shown_first(self.seed, annotator, item)
        row = {"annotator": annotator, "item": item, "prompt": a.prompt, "outcome": outcome_of(choice, a_first),
               "shown_first": "answers" if a_first else "baseline", "choice": choice, "answers": a.where,
               "baseline": b.where, "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        with self._lock:
            if item in self.verdicts.get(annotator, {}):
                return None
            with self.path.open("a") as f:  # appended and flushed at once: a crash loses no given verdict
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.verdicts.setdefault(annotator, {})[item] = row
        return row

    def progress(self) -> dict[str, int]:
        """Verdicts given per annotator."""
        return {name: len(items) for name, items in sorted(self.verdicts.items())}


def check_name(annotator: str) -> str:
    if not NAME.fullmatch(annotator):
        raise ValueError(f"annotator name {annotator!r}: use 1-40 letters, digits, '_', '.' or '-'")
    return annotator


def read_human(folder: str, truncate_torn: bool = False) -> list[dict]:
    """The rows of FOLDER/human.jsonl (none when it does not exist); a last line torn by a kill is
    left out (and cut off the file with `truncate_torn`), a broken line before it is refused."""
    path = storage.path(folder) / HUMAN
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if truncate_torn and len(complete) < len(data):
        os.truncate(path, len(complete))
    rows = []
    for number, line in enumerate(complete.decode("utf-8").split("\n")[:-1], start=1):
        try:
            row = json.loads(line)
            if row["outcome"] not in OUTCOMES or not isinstance(row["item"], int) or not isinstance(row["annotator"], str):
                raise KeyError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{number}: not a human verdict row (annotator, item, outcome)") from None
        rows.append(row)
    return rows


def verdict_table(rows: Sequence[dict]) -> dict[str, dict[int, str]]:
    """annotator -> item -> outcome (an annotator's first verdict on a prompt counts)."""
    table: dict[str, dict[int, str]] = {}
    for row in rows:
        table.setdefault(row["annotator"], {}).setdefault(row["item"], row["outcome"])
    return table
